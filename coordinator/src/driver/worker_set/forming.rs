//! Forming the worker set: waiting for `cluster.workers` workers (or as
//! many as `min_workers` allows), joining them, giving ranks, the job and
//! the collective's bootstrap id, the ready check; replacing a lost local
//! worker. It forms; it does not decide what the job does next.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use stride_job::checkpoint::CheckpointError;
use stride_proto::exit;
use stride_proto::v1::{
    Assignment, CollectiveBootstrap, PeerAddress, coordinator_message, worker_message,
};
use tokio::time::Instant as TokioInstant;

use super::{
    Aside, Asides, Formation, MAX_COLLECTIVE_ID_BYTES, Occasion, Patience, Rank, ReadyReport, Wait,
    Worker, WorkerSet, natural_key,
};
use crate::driver::decay::DecayRequest;
use crate::driver::{DamagedStart, Interrupted, PreemptedForming};
use crate::local::Exited;
use crate::server::Event;

impl WorkerSet {
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
    pub(super) async fn replace_local(&mut self, step: u64, gone: Exited) -> Result<()> {
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
}
