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
//! rank becomes a [`RankFailure`] that names it (rank, host, pid, step).
//!
//! A resume's checkpoint files may still be being hashed
//! ([`WorkerSet::expect_check`]) while the set forms and the ranks load
//! them: every wait also watches for that verdict, a damaged checkpoint
//! ends the wait at once ([`DamagedStart`]), and
//! [`WorkerSet::settle_check`] holds the first step until it has come.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use stride_job::checkpoint::CheckpointError;
use stride_job::config::Config;
use stride_proto::exit;
use stride_proto::v1::{
    Abort, Assignment, CheckpointReport, CollectiveBootstrap, CoordinatorMessage, PeerAddress,
    Shutdown, coordinator_message, worker_message,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;

use stride_job::tokens::Fingerprint;

use super::decay::DecayRequest;
use super::recovery::{Load, RankFailure};
use super::{DamagedStart, Interrupted, PreemptedForming};
use crate::local::{Exited, LocalWorkers};
use crate::server::{Event, Outbound, Shared, WorkerInfo};

/// The checkpoint check's result: a damaged checkpoint is a
/// [`DamagedStart`].
fn verdict_of(v: Result<Result<(), CheckpointError>, tokio::task::JoinError>) -> Result<Wait> {
    match v {
        Ok(Ok(())) => {
            tracing::info!("the checkpoint's files match their sha256");
            Ok(Wait::Checked)
        }
        Ok(Err(e)) => Err(DamagedStart(e).into()),
        Err(e) => Err(anyhow!("the checkpoint check stopped: {e}")),
    }
}

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
    /// Rank 0 of the current generation wrote a checkpoint's files.
    Checkpoint(CheckpointReport),
    /// A first SIGTERM: stop after the step in flight, with a checkpoint.
    Preempt,
    /// `coordinator decay`, for the next step boundary.
    Decay(DecayRequest),
}

/// The driver's side of [`Aside`]s.
pub trait Asides {
    fn take(&mut self, aside: Aside) -> Result<()>;
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

/// The hashing of a resume's checkpoint files, running on a blocking
/// thread.
pub type Check = JoinHandle<Result<(), CheckpointError>>;

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
            return verdict_of(verdict).map(|_| ());
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

    /// Waits for `cluster.workers` workers (see [`Occasion`]), gives them
    /// ranks and the job, hands them the collective's id, and checks that
    /// they built the same model from the same data.
    pub async fn form(&mut self, f: Formation<'_>, asides: &mut impl Asides) -> Result<()> {
        self.symptom = None;
        self.closed.clear();
        self.grow = false;
        let startup = Duration::from_secs_f64(self.config.cluster.startup_timeout_s);
        self.join(f.step, f.occasion, asides).await?;
        // The ranks get the whole start-up time for what follows, however
        // long joining took (waiting for a replacement that never came).
        let deadline = TokioInstant::now() + startup;
        let world = self.ranks.len();
        let span = tracing::info_span!(
            parent: None,
            "form_world",
            generation = self.generation as i64,
            world_size = world as i64,
            start_step = f.step as i64,
            load = %f.load.map(|l| l.dir.display().to_string()).unwrap_or_default(),
        );
        span.follows_from(f.job_span);
        let trace_context = stride_telemetry::carrier(&span);
        // Ranks are numbered afresh: no series of a rank that is gone.
        self.shared.metrics.rank_step_seconds.clear();
        self.shared
            .metrics
            .world_size
            .set(i64::try_from(world).unwrap_or(i64::MAX));
        let peers: Vec<PeerAddress> = self
            .ranks
            .iter()
            .map(|r| PeerAddress {
                host: r.worker.info.collective_host.clone(),
                port: u32::from(r.worker.info.collective_port),
            })
            .collect();
        let accumulation = self.config.accumulation_for(world)?;
        let generation = self.generation;
        self.send_all(f.step, |rank| {
            coordinator_message::Body::Assignment(Assignment {
                rank: rank as u32,
                world_size: world as u32,
                generation,
                config_toml: f.config_toml.to_string(),
                peers: peers.clone(),
                accumulation: accumulation as u32,
                load_checkpoint: f
                    .load
                    .map(|l| l.dir.display().to_string())
                    .unwrap_or_default(),
                weights_only: f.load.is_some_and(|l| l.weights_only),
                trace_context: trace_context.clone(),
            })
        })
        .await;

        // The collective is formed from one id that rank 0 makes (NCCL's
        // unique id, a nonce for the TCP ring): the coordinator hands it to
        // every rank, so no shared file or extra rendezvous is needed.
        let patience = Patience::Until(deadline);
        let unique_id = loop {
            let Some((rank, body)) = self
                .next(f.step, patience, "to start the collective", &[0], asides)
                .await?
            else {
                continue;
            };
            if let worker_message::Body::Bootstrap(b) = body
                && rank == 0
                && b.generation == generation
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
        self.send_all(f.step, |_| {
            coordinator_message::Body::Bootstrap(CollectiveBootstrap {
                generation,
                unique_id: unique_id.clone(),
            })
        })
        .await;

        // Every rank must report the same parameter layout and initial weights.
        let ready = self
            .gather(
                f.step,
                patience,
                "to build its model",
                |generation, body| match body {
                    worker_message::Body::Ready(r) if r.generation == generation => {
                        Some(ReadyReport {
                            layout_hash: r.parameter_layout_hash,
                            weights_hash: r.weights_hash,
                            data: r.data,
                        })
                    }
                    _ => None,
                },
                asides,
            )
            .await?;
        for (rank, r) in ready.iter().enumerate() {
            if let Some(why) = crate::server::data_refusal(f.data, &r.data) {
                bail!("{} {why}", self.ranks[rank].describe(rank));
            }
        }
        let first = &ready[0];
        for (rank, r) in ready.iter().enumerate().skip(1) {
            if r.layout_hash != first.layout_hash {
                bail!(
                    "{} built a model with other parameter names or shapes than rank 0; every worker must run the same config and binary",
                    self.ranks[rank].describe(rank)
                );
            }
            if r.weights_hash != first.weights_hash {
                bail!(
                    "{} initialised different weights from rank 0 (seeded initialisation disagrees)",
                    self.ranks[rank].describe(rank)
                );
            }
        }
        if let Some(load) = f.load {
            let got = stride_job::names::hex(&first.weights_hash);
            if got != load.weights_hash {
                // The files passed their sums, yet hold other weights than
                // the checkpoint recorded: the checkpoint is damaged (its
                // state and files disagree), so a resume of `latest` falls
                // back as for any other damage.
                return Err(DamagedStart(CheckpointError::Invalid {
                    path: load.dir.clone(),
                    message: format!(
                        "the ranks loaded weights with hash {got}, but its train_state.json records {}: its files and its state disagree",
                        load.weights_hash
                    ),
                })
                .into());
            }
            tracing::info!("all {world} ranks loaded the checkpoint's weights (hash {got})");
        }
        tracing::info!(
            "all {world} ranks built the same model; training starts at step {}",
            f.step
        );
        Ok(())
    }

    /// Waits for workers as `occasion` says and gives them ranks in a new
    /// generation: `cluster.workers` of them, or after a failure (once
    /// `rejoin_timeout_s` has passed) or for a [`Occasion::Grow`] as many
    /// as are present — at least `cluster.min_workers`, and a count the
    /// global batch divides among.
    async fn join(
        &mut self,
        step: u64,
        occasion: Occasion,
        asides: &mut impl Asides,
    ) -> Result<()> {
        let c = &self.config.cluster;
        let (want, startup_s, rejoin_s) = (c.workers, c.startup_timeout_s, c.rejoin_timeout_s);
        let now = TokioInstant::now();
        let deadline = now + Duration::from_secs_f64(startup_s);
        // When fewer workers than `want` may do.
        let settle_at = match occasion {
            Occasion::Start => None,
            Occasion::Restart => Some(now + Duration::from_secs_f64(rejoin_s)),
            Occasion::Grow => Some(now),
        };
        let mut joined: Vec<Worker> = std::mem::take(&mut self.pool);
        loop {
            if joined.len() >= want {
                break;
            }
            let settling = settle_at.is_some_and(|t| TokioInstant::now() >= t);
            if settling && let Some(n) = self.usable(joined.len()) {
                tracing::warn!(
                    "continuing with {n} of {want} workers (cluster.min_workers = {}); a replacement that joins later is taken back at the next step boundary",
                    self.config.cluster.min_workers
                );
                joined.sort_by_key(|w| natural_key(&w.info.identity));
                self.pool = joined.split_off(n);
                break;
            }
            let wake = match settle_at {
                Some(t) if !settling => t.min(deadline),
                _ => deadline,
            };
            let waited = match self.next_event(step, wake).await {
                Err(e) if e.is::<DamagedStart>() => {
                    // Kept for the start from an older checkpoint.
                    self.pool = joined;
                    return Err(e);
                }
                other => other?,
            };
            match waited {
                Wait::TimedOut if TokioInstant::now() < deadline => {}
                Wait::TimedOut => {
                    let present = joined.len();
                    // Kept, so that the job's end tells them to stop
                    // (dropping them would look like a lost coordinator,
                    // and they would try to reconnect).
                    self.pool = joined;
                    let fewer = match occasion {
                        Occasion::Start => String::new(),
                        _ => format!(
                            " (after a failure at least cluster.min_workers = {} that the global batch divides among)",
                            self.config.cluster.min_workers
                        ),
                    };
                    bail!(
                        "only {present} of {want} workers joined within cluster.startup_timeout_s = {startup_s}s{fewer}; start more `worker --connect` processes or pass --workers {}",
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
                    if let Some(at) = joined.iter().position(|w| w.info.identity == info.identity) {
                        let old = joined.remove(at);
                        tracing::warn!(
                            "worker {} (pid {}) replaced by a newer one of the same identity (pid {})",
                            old.info.identity,
                            old.info.pid,
                            info.pid
                        );
                        old.stop(
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
                    joined.push(Worker {
                        id: worker_id,
                        info,
                        outbound,
                    });
                }
                Wait::Event(Event::Left { worker_id, reason }) => {
                    if let Some(at) = joined.iter().position(|w| w.id == worker_id) {
                        let w = joined.remove(at);
                        tracing::warn!(
                            "worker {} ({}, pid {}) left before the worker set formed: {reason}",
                            w.info.identity,
                            w.info.host,
                            w.info.pid
                        );
                    }
                }
                Wait::Event(Event::Interrupted(sig)) => return Err(Interrupted(sig).into()),
                // No step is in flight while the worker set forms: the
                // newest checkpoint already holds everything to save.
                Wait::Event(Event::Preempt) => {
                    self.pool = joined;
                    return Err(PreemptedForming.into());
                }
                Wait::Event(Event::Decay { over, shape, reply }) => {
                    asides.take(Aside::Decay(DecayRequest { over, shape, reply }))?;
                }
                Wait::Exited(gone) => {
                    // A local worker that died before it held a rank
                    // (before it registered, or idle between generations).
                    joined.retain(|w| w.info.identity != gone.identity());
                    self.replace_local(step, gone).await?;
                }
                Wait::Event(Event::Message { .. }) | Wait::Checked => {}
            }
        }
        // Stable ranks: by identity (local-0, local-1, …, or pod index), in
        // natural order; ties keep join order.
        joined.sort_by_key(|w| natural_key(&w.info.identity));
        self.generation += 1;
        self.ranks = joined
            .into_iter()
            .map(|worker| Rank {
                worker,
                last_step: 0,
                last_step_s: 0.0,
            })
            .collect();
        self.by_id = self
            .ranks
            .iter()
            .enumerate()
            .map(|(i, r)| (r.worker.id.clone(), i))
            .collect();
        Ok(())
    }

    /// The most workers, of `present`, a formation after a failure may go
    /// on with: at least `cluster.min_workers`, at most `cluster.workers`,
    /// and a count the global batch divides among.
    fn usable(&self, present: usize) -> Option<usize> {
        let c = &self.config.cluster;
        (c.min_workers..=present.min(c.workers))
            .rev()
            .find(|n| self.config.accumulation_for(*n).is_ok())
    }

    /// Whether the job runs short and the workers connected now would let
    /// it run with more ranks (a replacement joined after it went on with
    /// fewer): the driver then re-forms the set at the next step boundary.
    pub fn can_grow(&self) -> bool {
        self.grow
            && self
                .usable(self.connected())
                .is_some_and(|n| n > self.ranks.len())
    }

    /// A local worker process exited on its own without holding a rank:
    /// start a fresh one in its slot — unless it said the job cannot work
    /// (bad input, exit 2): that is the job's failure, with its log.
    async fn replace_local(&mut self, step: u64, gone: Exited) -> Result<()> {
        self.pool.retain(|w| w.info.identity != gone.identity());
        if gone.gave_up() {
            bail!(
                "local worker {} (pid {}) stopped at step {step} ({}) and cannot work with this job; {}",
                gone.slot,
                gone.pid,
                gone.status,
                gone.log
            );
        }
        if let Some(local) = &mut self.local {
            let pid = local.restart(gone.slot).await?;
            tracing::warn!(
                "local worker {} (pid {}) exited at step {step} without holding a rank ({}); restarted it (pid {pid})",
                gone.slot,
                gone.pid,
                gone.status
            );
        }
        Ok(())
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

    /// The next message from a ranked worker, turning failures into errors
    /// that name the rank; `None` after an [`Aside`] was handed over or the
    /// checkpoint check passed. `what`
    /// says what the ranks are doing, for the timeout message.
    pub async fn next(
        &mut self,
        step: u64,
        patience: Patience,
        what: &str,
        waiting_for: &[usize],
        asides: &mut impl Asides,
    ) -> Result<Option<(usize, worker_message::Body)>> {
        let hb_every = Duration::from_secs_f64(self.config.cluster.heartbeat_interval_s);
        let hb_timeout = Duration::from_secs_f64(self.config.cluster.heartbeat_timeout_s);
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
                if let Some(failure) = self
                    .silent_rank(step, hb_timeout)
                    .or_else(|| self.closed_rank(step, hb_timeout))
                {
                    return Err(failure.into());
                }
            }
            let deadline = self.deadline(patience, waiting_for);
            let mut wake = deadline.min(next_check);
            if let Some((since, _)) = &self.symptom {
                wake = wake.min(TokioInstant::from_std(*since + symptom_grace));
            }
            match self.next_event(step, wake).await? {
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
                        repeatable: true,
                    }
                    .into());
                }
                Wait::TimedOut if TokioInstant::now() >= self.deadline(patience, waiting_for) => {
                    return Err(self.timed_out(step, patience, what, waiting_for).into());
                }
                Wait::TimedOut => {}
                Wait::Checked => return Ok(None),
                Wait::Exited(gone) => self.replace_local(step, gone).await?,
                Wait::Event(Event::Interrupted(sig)) => return Err(Interrupted(sig).into()),
                Wait::Event(Event::Preempt) => {
                    asides.take(Aside::Preempt)?;
                    return Ok(None);
                }
                Wait::Event(Event::Decay { over, shape, reply }) => {
                    asides.take(Aside::Decay(DecayRequest { over, shape, reply }))?;
                    return Ok(None);
                }
                Wait::Event(Event::Left { worker_id, reason }) => {
                    self.pool.retain(|w| w.id != worker_id);
                    if let Some(&rank) = self.by_id.get(&worker_id) {
                        return Err(RankFailure {
                            message: format!(
                                "{} lost at step {step}: {reason}",
                                self.ranks[rank].describe(rank),
                            ),
                            cause: format!("{} left", self.ranks[rank].worker.info.identity),
                            repeatable: false,
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
                    let worker = Worker {
                        id: worker_id,
                        info,
                        outbound,
                    };
                    if let Some(failure) = self.joined_while_running(step, worker).await {
                        return Err(failure.into());
                    }
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
                                "{} failed at step {step}: {}",
                                self.ranks[rank].describe(rank),
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
                                    self.ranks[rank].worker.info.identity, e.message
                                ),
                                repeatable: true,
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
                        // Only rank 0 writes, and only its report of this
                        // generation counts.
                        worker_message::Body::Checkpoint(r) => {
                            if rank == 0 && r.generation == self.generation {
                                asides.take(Aside::Checkpoint(r))?;
                            }
                            return Ok(None);
                        }
                        other => return Ok(Some((rank, other))),
                    }
                }
            }
        }
    }

    /// A worker joined while the set trains. One with a rank's identity
    /// (Kubernetes restarted that index's pod) means that rank's process is
    /// gone, even before its stream says so: the failure to restart from.
    /// Any other waits as a spare, or is turned away when the job is full.
    async fn joined_while_running(&mut self, step: u64, worker: Worker) -> Option<RankFailure> {
        let info = &worker.info;
        if let Some(rank) = self
            .ranks
            .iter()
            .position(|r| r.worker.info.identity == info.identity)
        {
            let old = &self.ranks[rank];
            let failure = RankFailure {
                worker_id: Some(old.worker.id.clone()),
                message: format!(
                    "{} lost at step {step}: a new worker with its identity joined ({}, pid {}), so this one is gone (its pod was replaced)",
                    old.describe(rank),
                    info.host,
                    info.pid
                ),
                cause: format!("{} replaced", info.identity),
                repeatable: false,
            };
            self.last_seen.insert(worker.id.clone(), Instant::now());
            let identity = info.identity.clone();
            self.pool.retain(|w| w.info.identity != identity);
            self.pool.push(worker);
            return Some(failure);
        }
        if self.connected() < self.config.cluster.max_workers {
            self.last_seen.insert(worker.id.clone(), Instant::now());
            let short = self.ranks.len() < self.config.cluster.workers;
            tracing::info!(
                "worker {} ({}, pid {}) joined as a spare; {}",
                info.identity,
                info.host,
                info.pid,
                if short {
                    "the job runs short of cluster.workers, so it is taken in at the next step boundary (after a checkpoint of it)"
                } else {
                    "it takes part from the next restart"
                }
            );
            self.pool.push(worker);
            self.grow |= short;
            return None;
        }
        tracing::warn!(
            "turned away worker {} ({}): the job is full",
            info.identity,
            info.host
        );
        worker
            .stop("the job already has all its workers", exit::DONE)
            .await;
        None
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

    /// The next event, or `TimedOut` at `deadline`. Wakes at least every
    /// heartbeat interval to mark the driver loop alive (the health service
    /// reads it).
    async fn next_event(&mut self, step: u64, deadline: TokioInstant) -> Result<Wait> {
        let every = Duration::from_secs_f64(self.config.cluster.heartbeat_interval_s);
        loop {
            self.shared.driver_tick();
            let wake = deadline.min(TokioInstant::now() + every);
            match self.next_event_until(step, wake).await? {
                Wait::TimedOut if TokioInstant::now() < deadline => continue,
                other => return Ok(other),
            }
        }
    }

    async fn next_event_until(&mut self, step: u64, deadline: TokioInstant) -> Result<Wait> {
        let local = self.local.as_mut();
        let check = self.check.as_mut();
        let mut verdict = None;
        let waited = tokio::select! {
            v = async move {
                match check {
                    Some(c) => c.await,
                    None => std::future::pending().await,
                }
            } => {
                verdict = Some(v);
                Ok(Wait::Checked)
            }
            ev = self.events.recv() => ev.map(Wait::Event).ok_or_else(|| anyhow!("the gRPC service stopped")),
            gone = async move {
                match local {
                    Some(l) => l.exited().await,
                    None => std::future::pending().await,
                }
            } => {
                let identity = gone.identity();
                match self.ranks.iter().position(|r| r.worker.info.identity == identity) {
                    Some(rank) if gone.gave_up() => Err(anyhow!(
                        "{} stopped at step {step} ({}) and cannot work with this job; {}",
                        self.ranks[rank].describe(rank),
                        gone.status,
                        gone.log
                    )),
                    Some(rank) => Err(RankFailure {
                        worker_id: Some(self.ranks[rank].worker.id.clone()),
                        message: format!(
                            "{} lost at step {step}: the process exited ({}); {}",
                            self.ranks[rank].describe(rank),
                            gone.status,
                            gone.log
                        ),
                        cause: format!("{identity} exited"),
                        repeatable: false,
                    }
                    .into()),
                    None => Ok(Wait::Exited(gone)),
                }
            }
            _ = tokio::time::sleep_until(deadline) => Ok(Wait::TimedOut),
        };
        if let Some(v) = verdict {
            // A finished task must not be awaited again.
            self.check = None;
            verdict_of(v)?;
        }
        waited
    }

    /// The first rank silent for longer than `hb_timeout`, as a failure
    /// that names it.
    fn silent_rank(&self, step: u64, hb_timeout: Duration) -> Option<RankFailure> {
        self.ranks.iter().enumerate().find_map(|(rank, r)| {
            let silent = self
                .last_seen
                .get(&r.worker.id)
                .map_or(Duration::ZERO, |t| t.elapsed());
            (silent > hb_timeout).then(|| RankFailure {
                worker_id: Some(r.worker.id.clone()),
                message: format!(
                    "{} lost at step {step}: no heartbeat for {:.1}s (cluster.heartbeat_timeout_s = {}): frozen, overloaded or cut off",
                    r.describe(rank),
                    silent.as_secs_f64(),
                    self.config.cluster.heartbeat_timeout_s
                ),
                cause: format!("no heartbeat from {}", r.worker.info.identity),
                repeatable: false,
            })
        })
    }

    /// A rank whose session was found closed when sent to longer than
    /// `hb_timeout` ago, and whose `Left` event never came.
    fn closed_rank(&self, step: u64, hb_timeout: Duration) -> Option<RankFailure> {
        self.closed
            .iter()
            .find(|(_, since)| since.elapsed() > hb_timeout)
            .and_then(|(&rank, _)| self.ranks.get(rank).map(|r| (rank, r)))
            .map(|(rank, r)| RankFailure {
                worker_id: Some(r.worker.id.clone()),
                message: format!(
                    "{} lost at step {step}: its session is closed",
                    r.describe(rank)
                ),
                cause: format!("{} left", r.worker.info.identity),
                repeatable: false,
            })
    }

    /// When `patience` runs out for the ranks in `waiting_for`.
    fn deadline(&self, patience: Patience, waiting_for: &[usize]) -> TokioInstant {
        match patience {
            Patience::Until(d) => d,
            Patience::Idle { since, limit } => {
                let last = waiting_for
                    .iter()
                    .filter_map(|&i| self.ranks.get(i))
                    .filter_map(|r| self.progress.get(&r.worker.id))
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
    fn timed_out(
        &self,
        step: u64,
        patience: Patience,
        what: &str,
        waiting_for: &[usize],
    ) -> RankFailure {
        let c = &self.config;
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
                let seen = self.last_seen.get(&r.worker.id).map(Instant::elapsed);
                let heard = seen.map_or(String::new(), |t| {
                    format!(", last heard {:.1}s ago", t.as_secs_f64())
                });
                let progressed = match self.progress.get(&r.worker.id) {
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
            "timed out at step {step} waiting for ranks {what} (not answered: {})",
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
            repeatable: all_alive,
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
