//! Waiting on the ranks: the next message, a step's answers, heartbeats,
//! timeouts and closed sessions, each failure turned into a
//! [`RankFailure`] that names the rank. It reports; it does not retry.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use stride_proto::exit;
use stride_proto::v1::worker_message;
use tokio::time::Instant as TokioInstant;

use super::{Aside, Asides, Patience, Wait, Worker, WorkerSet};
use crate::driver::Interrupted;
use crate::driver::decay::DecayRequest;
use crate::driver::recovery::RankFailure;
use crate::resume_check;
use crate::server::Event;

impl WorkerSet {
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
            if asides.tick()? {
                return Ok(None);
            }
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
                        // The writers' reports of this generation (rank 0,
                        // or every rank of a sharded job): the commit
                        // counts them.
                        worker_message::Body::Checkpoint(r) => {
                            if r.generation == self.generation {
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

    /// The next event, or `TimedOut` at `deadline`. Wakes at least every
    /// heartbeat interval to mark the driver loop alive (the health service
    /// reads it).
    pub(super) async fn next_event(&mut self, step: u64, deadline: TokioInstant) -> Result<Wait> {
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
            resume_check::verdict(v)?;
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
