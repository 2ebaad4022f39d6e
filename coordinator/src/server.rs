//! The gRPC boundary: the `stride.v1.Coordinator` service.
//!
//! This module only translates between the wire and the driver: it checks
//! versions at registration, turns each worker's session stream into
//! [`Event`]s on one channel, and hands the driver a sender for messages to
//! that worker. It decides nothing about the job; `tonic::Status` does not
//! leave this file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stride_job::schedule::Cooldown;
use stride_job::tokens::Fingerprint;
use stride_proto::PROTOCOL_VERSION;
use stride_proto::v1::coordinator_server::Coordinator;
use stride_proto::v1::{
    CoordinatorMessage, DataSplit, DecayRequest, DecayResponse, RegisterRequest, RegisterResponse,
    Shutdown, StatusRequest, StatusResponse, WorkerMessage, coordinator_message, worker_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Checks the job token of every RPC (constant-time), and logs refusals
/// with the peer's address. A refused call changes no state.
#[derive(Debug, Clone)]
pub struct Authenticator {
    expected: Arc<Vec<u8>>,
}

impl Authenticator {
    pub fn new(token: &str) -> Authenticator {
        Authenticator {
            expected: Arc::new(stride_proto::client::bearer(token).into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(stride_proto::client::AUTH_METADATA_KEY)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if stride_job::auth::matches(presented, &self.expected) {
            return Ok(request);
        }
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        tracing::warn!("refused an RPC from {peer}: missing or wrong job token");
        Err(Status::unauthenticated(
            "missing or wrong job token: pass the coordinator's token with --token-file or STRIDE_TOKEN",
        ))
    }
}

/// The version every worker must share with the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Bound on any single gRPC message, both directions.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// What a worker told us about itself at registration.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub host: String,
    pub pid: u32,
    pub collective_host: String,
    pub collective_port: u16,
    pub device: String,
    pub identity: String,
}

/// Messages to one worker.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// What the driver hears from the service.
#[derive(Debug)]
pub enum Event {
    /// A registered worker opened its session stream.
    Joined {
        worker_id: String,
        info: WorkerInfo,
        outbound: Outbound,
    },
    /// A message on a worker's stream.
    Message {
        worker_id: String,
        body: worker_message::Body,
    },
    /// A worker's stream ended or failed.
    Left { worker_id: String, reason: String },
    /// Stop at once: Ctrl-C, or a second SIGTERM.
    Interrupted(&'static str),
    /// A first SIGTERM (preemption, a node drain): finish the step in
    /// flight, checkpoint it, then stop.
    Preempt,
    /// `coordinator decay`: a cooldown from the next step boundary; the
    /// driver answers on `reply` when it has applied or refused it.
    Decay {
        over: u64,
        shape: Cooldown,
        reply: tokio::sync::oneshot::Sender<Result<DecayResponse, Status>>,
    },
}

/// How long the driver loop may go without a round before the health
/// service says NOT_SERVING: 5 heartbeat intervals, at least 5 s.
pub fn health_bound(heartbeat_interval_s: f64) -> Duration {
    Duration::from_secs_f64((5.0 * heartbeat_interval_s).max(5.0))
}

/// What a worker is told at registration: the job's config, so that it
/// can open the job's data before it joins, and the fingerprints of that
/// data, which it must match.
#[derive(Debug, Clone, Default)]
pub struct JobForWorkers {
    pub config_toml: String,
    pub data: Vec<Fingerprint>,
    /// The job is already finished (a coordinator restarted after its
    /// final commit): every worker that joins is told so and exits 0.
    pub finished: Option<String>,
}

/// A fingerprint on the wire.
pub fn to_wire(f: &Fingerprint) -> DataSplit {
    DataSplit {
        split: f.split.clone(),
        name: f.name.clone(),
        tokens: f.tokens,
        checksum: u64::from_str_radix(&f.xxh3, 16).unwrap_or(0),
    }
}

/// A fingerprint from the wire.
pub fn from_wire(d: &DataSplit) -> Fingerprint {
    Fingerprint::new(&d.split, &d.name, d.tokens, d.checksum)
}

/// Why a worker whose data differs from the job's is refused, or `None`
/// when they agree (a worker that reports no splits, such as the load
/// test's simulated ones, is not checked).
pub fn data_refusal(job: &[Fingerprint], worker: &[DataSplit]) -> Option<String> {
    if worker.is_empty() {
        return None;
    }
    for want in job {
        let theirs = worker.iter().find(|d| d.split == want.split).map(from_wire);
        if theirs.as_ref().is_some_and(|t| t.same_tokens(want)) {
            continue;
        }
        let theirs = theirs.map_or("no such split".to_string(), |t| t.describe());
        return Some(format!(
            "its {} data differs from the job's: the worker's {theirs}; the coordinator's {}. Every worker must read the same token files (a shared volume, the same data.train / data.val)",
            want.split,
            want.describe()
        ));
    }
    None
}

/// State shared between the service and the driver.
#[derive(Debug)]
pub struct Shared {
    pub events: mpsc::UnboundedSender<Event>,
    pub heartbeat_interval: Duration,
    /// Told to every worker at registration.
    pub job: JobForWorkers,
    pub status: Mutex<StatusResponse>,
    /// The Prometheus numbers (served only with --metrics-listen).
    pub metrics: Arc<crate::metrics::Metrics>,
    registered: Mutex<HashMap<String, WorkerInfo>>,
    next_id: AtomicU64,
    /// When the driver loop last went round (ms since `started`): it wakes
    /// at least every heartbeat interval, so a stale value means the loop
    /// is stuck (the health service then says NOT_SERVING).
    driver_tick_ms: AtomicU64,
    started: std::time::Instant,
}

impl Shared {
    /// The driver loop is alive.
    pub fn driver_tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.driver_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the driver loop last went round.
    pub fn driver_idle(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.driver_tick_ms.load(Ordering::Relaxed)))
    }

    pub fn new(
        events: mpsc::UnboundedSender<Event>,
        heartbeat_interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        job: JobForWorkers,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            events,
            heartbeat_interval,
            job,
            metrics,
            status: Mutex::new(StatusResponse::default()),
            registered: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            driver_tick_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Service {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = request.remote_addr();
        // A child of the worker's `register` span (context in the metadata).
        let span = tracing::info_span!(
            "register",
            identity = tracing::field::Empty,
            host = tracing::field::Empty,
            worker_id = tracing::field::Empty,
        );
        stride_telemetry::parent_from_metadata(&span, request.metadata());
        let _entered = span.enter();
        let r = request.into_inner();
        span.record("identity", r.identity.as_str());
        span.record("host", r.host.as_str());
        if r.version != VERSION || r.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(?peer, worker_version = %r.version, "refused a worker of another version");
            return Err(Status::failed_precondition(format!(
                "worker version {} (protocol {}) cannot join coordinator version {VERSION} (protocol {PROTOCOL_VERSION}); run the same Stride release on both sides",
                r.version, r.protocol_version
            )));
        }
        let port = u16::try_from(r.collective_port).map_err(|_| {
            Status::invalid_argument(format!(
                "collective port {} is not a port",
                r.collective_port
            ))
        })?;
        let worker_id = format!("w{}", self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let info = WorkerInfo {
            host: r.host,
            pid: r.pid,
            collective_host: r.collective_host,
            collective_port: port,
            device: r.device,
            identity: r.identity,
        };
        span.record("worker_id", worker_id.as_str());
        tracing::debug!(%worker_id, host = %info.host, pid = info.pid, "worker registered");
        self.shared
            .registered
            .lock()
            .map_err(|_| Status::internal("registry poisoned"))?
            .insert(worker_id.clone(), info);
        Ok(Response::new(RegisterResponse {
            worker_id,
            coordinator_version: VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: self.shared.heartbeat_interval.as_millis() as u32,
            config_toml: self.shared.job.config_toml.clone(),
            data: self.shared.job.data.iter().map(to_wire).collect(),
        }))
    }

    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.body)
            .ok_or_else(|| Status::invalid_argument("a session must open with Hello"))?;
        let worker_message::Body::Hello(hello) = first else {
            return Err(Status::invalid_argument("a session must open with Hello"));
        };
        let info = self
            .shared
            .registered
            .lock()
            .map_err(|_| Status::internal("registry poisoned"))?
            .get(&hello.worker_id)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown worker id {}: call Register first",
                    hello.worker_id
                ))
            })?;
        let (tx, rx) = mpsc::channel(64);
        let stop = |tx: &Outbound, reason: String, exit_code: i32| {
            let _ = tx.try_send(Ok(CoordinatorMessage {
                body: Some(coordinator_message::Body::Shutdown(Shutdown {
                    reason,
                    exit_code,
                })),
            }));
        };
        if let Some(done) = &self.shared.job.finished {
            tracing::info!(
                "told worker {} ({}, pid {}) that {done}",
                info.identity,
                info.host,
                info.pid
            );
            stop(&tx, done.clone(), stride_proto::exit::DONE);
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        // A worker reading other data than the job's is refused here,
        // alone, before it can take part in anything: told to exit 2.
        if let Some(why) = data_refusal(&self.shared.job.data, &hello.data) {
            tracing::warn!(
                "refused worker {} ({}, pid {}): {why}",
                info.identity,
                info.host,
                info.pid
            );
            stop(
                &tx,
                format!("refused by the coordinator: {why}"),
                stride_proto::exit::BAD_INPUT,
            );
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let worker_id = hello.worker_id;
        let events = self.shared.events.clone();
        let _ = events.send(Event::Joined {
            worker_id: worker_id.clone(),
            info,
            outbound: tx,
        });
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(WorkerMessage { body: Some(body) })) => {
                        let _ = events.send(Event::Message {
                            worker_id: worker_id.clone(),
                            body,
                        });
                    }
                    Ok(Some(WorkerMessage { body: None })) => {}
                    Ok(None) => break "the worker closed its session".to_string(),
                    Err(s) => break format!("connection lost ({})", s.message()),
                }
            };
            let _ = events.send(Event::Left { worker_id, reason });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn decay(
        &self,
        request: Request<DecayRequest>,
    ) -> Result<Response<DecayResponse>, Status> {
        let r = request.into_inner();
        if r.over < 1 || r.over > stride_job::config::MAX_STEPS {
            return Err(Status::invalid_argument(format!(
                "--over {}: a cooldown needs 1..={} steps",
                r.over,
                stride_job::config::MAX_STEPS
            )));
        }
        let shape: Cooldown = r
            .shape
            .parse()
            .map_err(|e: stride_job::names::UnknownName| Status::invalid_argument(e.to_string()))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.shared
            .events
            .send(Event::Decay {
                over: r.over,
                shape,
                reply,
            })
            .map_err(|_| Status::unavailable("the job is ending"))?;
        match answer.await {
            Ok(result) => result.map(Response::new),
            Err(_) => Err(Status::failed_precondition(
                "the job ended before its next step: nothing to decay",
            )),
        }
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self
            .shared
            .status
            .lock()
            .map_err(|_| Status::internal("status poisoned"))?
            .clone();
        Ok(Response::new(s))
    }
}
