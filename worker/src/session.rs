//! The worker's side of the gRPC contract: register, keep one session
//! stream, and turn the coordinator's plans into work for the compute
//! thread.
//!
//! Two threads of control: the async session (network, heartbeats) and one
//! blocking compute thread that owns the [`Trainer`] — so a long step never
//! delays a heartbeat. The session obeys; it never decides a step, an LR or
//! a sample.
//!
//! Forming a worker set: on an `Assignment` the compute thread picks the
//! device, rank 0 sends the collective's id (`CollectiveBootstrap`), every
//! rank waits for the coordinator to hand it back, joins the collective
//! (NCCL on CUDA, the TCP ring otherwise) and reports `Ready`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use stride_job::config::{Config, Device as DeviceKind};
use stride_proto::client::TokenInterceptor;
use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{
    Assignment, CheckpointPlan, CheckpointReport, CollectiveBootstrap, DataSplit, EvalPlan,
    EvalReport, Heartbeat, Hello, Ready, RegisterRequest, StepPlan, StepReport, WorkerError,
    WorkerMessage, coordinator_message, worker_message,
};
use stride_proto::{PROTOCOL_VERSION, exit};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;

use crate::collective::{self, AbortHandle, CollectiveError, RingListener};
use crate::trainer::{Cancelled, Signals, Trainer};

/// This binary's version; the coordinator refuses any other.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How the worker was started.
#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub identity: String,
    /// CPU threads for compute (0 = from the job's `worker.threads`, else all cores).
    pub threads: usize,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// The shared job token sent with every RPC.
    pub token: String,
    /// TLS towards an `https://` coordinator.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Work for the compute thread.
enum Work {
    Assign(Assignment),
    /// The coordinator aborted the generation: drop the trainer.
    Reset,
    /// The shared id the collective of a generation is formed from.
    Bootstrap(CollectiveBootstrap),
    Step(StepPlan),
    Eval(EvalPlan),
    Checkpoint(CheckpointPlan),
}

fn msg(body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

/// The coordinator went away without saying stop (killed, restarted, or
/// the network failed): the worker reconnects and rejoins.
#[derive(Debug, thiserror::Error)]
#[error("lost the coordinator: {0}")]
pub struct CoordinatorLost(String);

/// Runs the worker until the coordinator says stop; returns the exit code
/// it asked for. If the coordinator disappears, the worker keeps trying to
/// reach it again (a restarted coordinator at the same address) for
/// `connect_timeout`, then rejoins as a new worker.
pub async fn run(opts: Options) -> Result<i32> {
    loop {
        match run_session(&opts).await {
            Err(e) if e.is::<CoordinatorLost>() => {
                tracing::warn!(
                    "{e:#}; reconnecting (for up to {:.0}s)",
                    opts.connect_timeout.as_secs_f64()
                );
            }
            other => return other,
        }
    }
}

async fn run_session(opts: &Options) -> Result<i32> {
    let endpoint = Endpoint::from_shared(opts.url.clone())
        .with_context(|| format!("--connect {}: not a URL such as http://HOST:PORT", opts.url))?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = match &opts.tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .context("bad TLS configuration")?,
        None => endpoint,
    };
    let channel = connect_with_retry(&endpoint, opts).await?;
    let mut client =
        CoordinatorClient::with_interceptor(channel, TokenInterceptor::new(&opts.token)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // The ring listens on the address this machine uses to reach the
    // coordinator: loopback stays loopback, a pod advertises its pod IP.
    let advertised = local_ip_towards(&opts.url).await?;
    let bind_ip = if advertised.is_loopback() {
        advertised
    } else {
        IpAddr::from([0, 0, 0, 0])
    };
    let listener =
        RingListener::bind(bind_ip).context("cannot open the collective's listening socket")?;
    let host = hostname();
    // The rank is not known yet (ranks are given when the worker set forms):
    // this span carries the identity instead.
    let span = tracing::info_span!("register", identity = %opts.identity, host = %host);
    let mut request = tonic::Request::new(RegisterRequest {
        version: VERSION.to_string(),
        protocol_version: PROTOCOL_VERSION,
        host: host.clone(),
        pid: std::process::id(),
        collective_host: advertised.to_string(),
        collective_port: u32::from(listener.port()),
        // What this build can run on (the job's config picks the device).
        device: if cfg!(feature = "cuda") {
            "cpu+cuda"
        } else {
            "cpu"
        }
        .to_string(),
        identity: opts.identity.clone(),
    });
    stride_telemetry::inject_metadata(&span, request.metadata_mut());
    // A server that accepts the connection but never answers (a TLS
    // coordinator reached over plaintext, a proxy) must not hold the
    // worker forever.
    let answer_within = opts.connect_timeout.max(Duration::from_secs(10));
    let reg = tokio::time::timeout(answer_within, client.register(request).instrument(span))
        .await
        .map_err(|_| {
            anyhow!(
                "{} accepted the connection but did not answer the registration within {:.0} s; is it a Stride coordinator, and does the URL's scheme (http/https) match its --tls-cert?",
                opts.url,
                answer_within.as_secs_f64()
            )
        })?
        .map_err(|s| anyhow!("the coordinator refused registration: {}", s.message()))?
        .into_inner();
    tracing::info!(
        "registered with coordinator {} as {} ({host}, pid {})",
        reg.coordinator_version,
        reg.worker_id,
        std::process::id()
    );

    let (out_tx, out_rx) = mpsc::channel::<WorkerMessage>(64);
    out_tx
        .send(msg(worker_message::Body::Hello(Hello {
            worker_id: reg.worker_id.clone(),
        })))
        .await
        .map_err(|_| anyhow!("session closed before it opened"))?;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| anyhow!("cannot open the session: {}", s.message()))?
        .into_inner();

    // Heartbeats carry the last completed step and the micro-batches done
    // so far; an abort sets the cancel flag the trainer checks.
    let signals = Arc::new(Signals::default());
    let beat = {
        let tx = out_tx.clone();
        let signals = signals.clone();
        let every = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(100)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let hb = Heartbeat {
                    step: signals.step.load(Ordering::Relaxed),
                    unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    progress: signals.micro_batches.load(Ordering::Relaxed),
                };
                if tx
                    .send(msg(worker_message::Body::Heartbeat(hb)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };

    let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
    let abort: AbortSlot = Arc::new(Mutex::new(None));
    // Why the compute thread ended, if it ended on its own (a panic or a
    // failure retrying cannot fix): the worker then exits with it.
    let (stopped_tx, mut stopped) = tokio::sync::oneshot::channel::<Option<Stop>>();
    let compute = {
        let tx = out_tx.clone();
        let threads = opts.threads;
        let abort = abort.clone();
        let signals = signals.clone();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                let generation = Arc::new(AtomicU64::new(0));
                let run = {
                    let (tx, signals, generation) = (tx.clone(), signals, generation.clone());
                    std::panic::AssertUnwindSafe(move || {
                        compute_loop(work_rx, tx, listener, threads, signals, abort, generation)
                    })
                };
                let why = match std::panic::catch_unwind(run) {
                    Ok(why) => why,
                    Err(payload) => {
                        let what = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        let message = format!("the compute thread panicked: {what}");
                        // Not fatal to the job: the coordinator restarts
                        // without this worker (and stops if it recurs).
                        let _ = tx.blocking_send(msg(worker_message::Body::Error(WorkerError {
                            generation: generation.load(Ordering::Relaxed),
                            message: message.clone(),
                            fatal: false,
                            collective_peer: None,
                        })));
                        Some(Stop {
                            why: message,
                            code: exit::FAILED,
                        })
                    }
                };
                let _ = stopped_tx.send(why);
            })
            .context("cannot start the compute thread")?
    };
    drop(out_tx);

    let code = loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            stop = &mut stopped => {
                let stop = stop.ok().flatten().unwrap_or(Stop {
                    why: "the compute thread stopped".into(),
                    code: exit::FAILED,
                });
                beat.abort();
                tracing::error!("{}; this worker stops (exit {})", stop.why, stop.code);
                eprintln!("error: {}; this worker stops (exit {})", stop.why, stop.code);
                return Ok(stop.code);
            }
        };
        let body = match next {
            Ok(Some(m)) => m.body,
            Ok(None) => {
                return Err(
                    CoordinatorLost("it closed the session without a shutdown".into()).into(),
                );
            }
            Err(s) => return Err(CoordinatorLost(s.message().to_string()).into()),
        };
        match body {
            Some(coordinator_message::Body::Assignment(a)) => send_work(&work_tx, Work::Assign(a))?,
            Some(coordinator_message::Body::Step(p)) => send_work(&work_tx, Work::Step(p))?,
            Some(coordinator_message::Body::Eval(p)) => send_work(&work_tx, Work::Eval(p))?,
            Some(coordinator_message::Body::Checkpoint(p)) => {
                send_work(&work_tx, Work::Checkpoint(p))?
            }
            Some(coordinator_message::Body::Shutdown(s)) => {
                tracing::info!("coordinator: {}", s.reason);
                signals.cancel.store(true, Ordering::Relaxed);
                break s.exit_code;
            }
            Some(coordinator_message::Body::Abort(a)) => {
                tracing::warn!(
                    "coordinator aborted generation {}: {}",
                    a.generation,
                    a.reason
                );
                // Stop the work in flight at its next micro-batch, unblock
                // a step stuck in the collective on a dead peer, then drop
                // the trainer and wait for a new assignment.
                signals.cancel.store(true, Ordering::Relaxed);
                if let Ok(mut h) = abort.lock()
                    && let Some(h) = h.take()
                {
                    h.abort();
                }
                send_work(&work_tx, Work::Reset)?;
            }
            Some(coordinator_message::Body::Bootstrap(b)) => {
                send_work(&work_tx, Work::Bootstrap(b))?
            }
            Some(coordinator_message::Body::Heartbeat(_)) | None => {}
        }
    };
    beat.abort();
    drop(work_tx);
    if let Ok(mut h) = abort.lock()
        && let Some(h) = h.take()
    {
        h.abort();
    }
    // The compute thread ends when its queue closes (a step in the
    // collective was just aborted).
    let _ = tokio::task::spawn_blocking(move || compute.join()).await;
    Ok(code)
}

fn send_work(tx: &std::sync::mpsc::Sender<Work>, w: Work) -> Result<()> {
    tx.send(w)
        .map_err(|_| anyhow!("the compute thread stopped"))
}

async fn connect_with_retry(endpoint: &Endpoint, opts: &Options) -> Result<Channel> {
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    let mut wait = Duration::from_millis(100);
    let mut told = false;
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if tokio::time::Instant::now() + wait > deadline {
                    bail!(
                        "no coordinator answered at {} within {:.0}s ({e}); start `coordinator` first, check the address, or raise --connect-timeout",
                        opts.url,
                        opts.connect_timeout.as_secs_f64()
                    );
                }
                if !told {
                    tracing::info!("waiting for the coordinator at {} ...", opts.url);
                    told = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The local address used to reach the coordinator's host (no packet is
/// sent: connecting a UDP socket only picks a route).
async fn local_ip_towards(url: &str) -> Result<IpAddr> {
    let uri: tonic::transport::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to no address"))?;
    let any: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Why the compute thread ended on its own, and the exit code it means.
#[derive(Debug)]
struct Stop {
    why: String,
    code: i32,
}

/// The compute thread: builds the trainer on assignment, then runs plans.
/// Where the compute thread leaves the abort handle of its collective.
type AbortSlot = Arc<Mutex<Option<AbortHandle>>>;

/// Returns why it stopped when that was its own decision (a failure
/// retrying cannot fix), `None` when its queue closed.
fn compute_loop(
    work: std::sync::mpsc::Receiver<Work>,
    out: mpsc::Sender<WorkerMessage>,
    listener: RingListener,
    threads: usize,
    signals: Arc<Signals>,
    abort: AbortSlot,
    current_generation: Arc<AtomicU64>,
) -> Option<Stop> {
    let mut trainer: Option<(u64, Trainer)> = None;
    let send = |body| {
        let _ = out.blocking_send(msg(body));
    };
    // Fatal: retrying cannot help (bad config, data, device). Not fatal: a
    // step failed (a peer died); the coordinator restarts the generation.
    let fail = |generation: u64, e: anyhow::Error, fatal: bool| {
        tracing::error!("{e:#}");
        let collective_peer = e
            .chain()
            .find_map(|c| match c.downcast_ref::<CollectiveError>() {
                Some(CollectiveError::Peer { peer, .. }) => u32::try_from(*peer).ok(),
                _ => None,
            });
        let _ = out.blocking_send(msg(worker_message::Body::Error(WorkerError {
            generation,
            message: format!("{e:#}"),
            fatal,
            collective_peer,
        })));
    };
    // Work read early while forming a collective, handled next.
    let mut deferred: Option<Work> = None;
    loop {
        let w = match deferred.take() {
            Some(w) => w,
            None => match work.recv() {
                Ok(w) => w,
                Err(_) => break,
            },
        };
        match w {
            Work::Bootstrap(_) => {} // of a formation that already failed
            Work::Assign(a) => {
                let generation = a.generation;
                current_generation.store(generation, Ordering::Relaxed);
                trainer = None;
                // The abort that preceded this assignment is over.
                signals.cancel.store(false, Ordering::Relaxed);
                let span = tracing::info_span!(
                    "assign",
                    rank = i64::from(a.rank),
                    world_size = i64::from(a.world_size),
                    generation = generation as i64,
                    load = %a.load_checkpoint,
                );
                stride_telemetry::set_parent(&span, &a.trace_context);
                let mut exchange = |mine: Option<Vec<u8>>, timeout: Duration| {
                    if let Some(unique_id) = mine {
                        send(worker_message::Body::Bootstrap(CollectiveBootstrap {
                            generation,
                            unique_id,
                        }));
                    }
                    wait_for_id(&work, generation, timeout, &mut deferred)
                };
                match span.in_scope(|| assign(&a, &listener, threads, &abort, &mut exchange)) {
                    Ok(mut t) => {
                        send(worker_message::Body::Ready(Ready {
                            generation,
                            parameter_layout_hash: t.layout_hash().to_le_bytes().to_vec(),
                            weights_hash: t.weights_hash().to_le_bytes().to_vec(),
                            parameter_count: t.weights().len() as u64,
                            data: t
                                .data_splits()
                                .into_iter()
                                .map(|(split, name, tokens, checksum)| DataSplit {
                                    split: split.into(),
                                    name,
                                    tokens,
                                    checksum,
                                })
                                .collect(),
                        }));
                        t.set_signals(signals.clone());
                        trainer = Some((generation, t));
                    }
                    Err(e) => {
                        // A ring that could not form (a peer died meanwhile)
                        // is retried by the coordinator; anything else is not.
                        let transient = e.chain().any(|c| c.is::<CollectiveError>());
                        let why = format!("{e:#}");
                        fail(generation, e, !transient);
                        if !transient {
                            // The job's config, data or device cannot work
                            // here: bad input for this worker.
                            return Some(Stop {
                                why,
                                code: exit::BAD_INPUT,
                            });
                        }
                    }
                }
            }
            Work::Reset => {
                trainer = None;
                if let Ok(mut h) = abort.lock() {
                    *h = None;
                }
            }
            Work::Step(p) => {
                let Some((generation, t)) = trainer.as_mut().filter(|(g, _)| *g == p.generation)
                else {
                    continue;
                };
                let span = tracing::info_span!(
                    "step",
                    rank = t.rank(),
                    step = p.step as i64,
                    lr = p.lr,
                    loss = tracing::field::Empty,
                    grad_norm = tracing::field::Empty,
                    compute_s = tracing::field::Empty,
                    allreduce_s = tracing::field::Empty,
                );
                stride_telemetry::set_parent(&span, &p.trace_context);
                let result = injected_failure(p.step, t.rank())
                    .and_then(|()| span.in_scope(|| t.step(&p.samples, p.lr)));
                match result {
                    Ok(o) => {
                        span.record("loss", o.loss);
                        span.record("grad_norm", o.grad_norm);
                        span.record("compute_s", o.compute_s);
                        span.record("allreduce_s", o.allreduce_s);
                        signals.step.store(p.step, Ordering::Relaxed);
                        send(worker_message::Body::Step(StepReport {
                            generation: *generation,
                            step: p.step,
                            loss: o.loss,
                            grad_norm: o.grad_norm,
                            tokens: o.tokens,
                            compute_s: o.compute_s,
                            allreduce_s: o.allreduce_s,
                            total_s: o.total_s,
                            weights_hash: o.weights_hash.to_le_bytes().to_vec(),
                        }));
                    }
                    Err(e) if e.is::<Cancelled>() => {
                        tracing::info!("step {}: {e}", p.step);
                        trainer = None;
                    }
                    Err(e) => {
                        fail(p.generation, e.context(format!("step {}", p.step)), false);
                        trainer = None;
                    }
                }
            }
            Work::Checkpoint(p) => {
                let Some((generation, t)) = trainer.as_ref().filter(|(g, _)| *g == p.generation)
                else {
                    continue;
                };
                if !p.write {
                    continue;
                }
                // Copy the state now (the step boundary) and write it while
                // the next steps run; the coordinator commits on the report.
                let span = tracing::info_span!(
                    "checkpoint_write",
                    rank = t.rank(),
                    step = p.step as i64,
                    dir = %p.tmp_dir,
                );
                stride_telemetry::set_parent(&span, &p.trace_context);
                let snapshot = span.in_scope(|| t.snapshot());
                let generation = *generation;
                let out = out.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("checkpoint".into())
                        .spawn(move || {
                            let start = std::time::Instant::now();
                            let written =
                                span.in_scope(|| snapshot.write(std::path::Path::new(&p.tmp_dir)));
                            let body = match written {
                                Ok(sha256) => worker_message::Body::Checkpoint(CheckpointReport {
                                    generation,
                                    step: p.step,
                                    sha256: sha256.into_iter().collect(),
                                    write_s: start.elapsed().as_secs_f64(),
                                }),
                                Err(e) => worker_message::Body::Error(WorkerError {
                                    generation,
                                    message: format!(
                                        "writing the checkpoint of step {} into {}: {e:#}",
                                        p.step, p.tmp_dir
                                    ),
                                    fatal: true,
                                    collective_peer: None,
                                }),
                            };
                            let _ = out.blocking_send(msg(body));
                        });
                if let Err(e) = spawned {
                    let why = format!("cannot start the checkpoint writer: {e}");
                    fail(generation, anyhow!("{why}"), true);
                    return Some(Stop {
                        why,
                        code: exit::FAILED,
                    });
                }
            }
            Work::Eval(p) => {
                let Some((generation, t)) = trainer.as_mut().filter(|(g, _)| *g == p.generation)
                else {
                    continue;
                };
                let span = tracing::info_span!(
                    "evaluation",
                    rank = t.rank(),
                    step = p.step as i64,
                    samples = p.samples.len() as i64,
                );
                stride_telemetry::set_parent(&span, &p.trace_context);
                match span.in_scope(|| t.evaluate(&p.samples)) {
                    Ok((loss_sum, tokens)) => send(worker_message::Body::Eval(EvalReport {
                        generation: *generation,
                        step: p.step,
                        loss_sum,
                        tokens,
                    })),
                    Err(e) if e.is::<Cancelled>() => {
                        tracing::info!("evaluation after step {}: {e}", p.step);
                        trainer = None;
                    }
                    Err(e) => {
                        fail(
                            p.generation,
                            e.context(format!("evaluation after step {}", p.step)),
                            false,
                        );
                        trainer = None;
                    }
                }
            }
        }
    }
    None
}

/// Test hooks, in debug builds only, fired as step `step` starts:
/// `STRIDE_TEST_PANIC_AT_STEP=N` makes the compute thread panic (a panic
/// must reach the coordinator with its message and end the worker);
/// `STRIDE_TEST_COLLECTIVE_ERROR_AT_STEP=N` makes rank 0 report, once per
/// process, that its all-reduce with rank 1 failed while every rank lives
/// (a symptom the coordinator must not take for a verdict).
fn injected_failure(step: u64, rank: i64) -> Result<()> {
    static COLLECTIVE_ERROR_INJECTED: AtomicBool = AtomicBool::new(false);
    let at = |key: &str| {
        cfg!(debug_assertions) && std::env::var(key).ok().and_then(|v| v.parse().ok()) == Some(step)
    };
    if at("STRIDE_TEST_PANIC_AT_STEP") {
        panic!("injected by STRIDE_TEST_PANIC_AT_STEP at step {step}");
    }
    if rank == 0
        && at("STRIDE_TEST_COLLECTIVE_ERROR_AT_STEP")
        && !COLLECTIVE_ERROR_INJECTED.swap(true, Ordering::Relaxed)
    {
        return Err(CollectiveError::Peer {
            op: "all-reduce",
            peer: 1,
            error: std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected by STRIDE_TEST_COLLECTIVE_ERROR_AT_STEP",
            ),
        }
        .into());
    }
    Ok(())
}

/// Waits for the coordinator to hand out the collective id of `generation`.
/// A new assignment or an abort arriving first ends the wait (and is kept
/// in `deferred` for the compute loop).
fn wait_for_id(
    work: &std::sync::mpsc::Receiver<Work>,
    generation: u64,
    timeout: Duration,
    deferred: &mut Option<Work>,
) -> Result<Vec<u8>> {
    use std::sync::mpsc::RecvTimeoutError;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match work.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(Work::Bootstrap(b)) if b.generation == generation => return Ok(b.unique_id),
            Ok(w @ (Work::Assign(_) | Work::Reset)) => {
                *deferred = Some(w);
                return Err(CollectiveError::Setup(
                    "the coordinator re-formed the worker set before this collective formed".into(),
                )
                .into());
            }
            Ok(_) => {} // stale plans or ids of an earlier generation
            Err(RecvTimeoutError::Timeout) => {
                return Err(CollectiveError::Setup(format!(
                    "no collective id from the coordinator within {:.0} s (cluster.step_timeout_s)",
                    timeout.as_secs_f64()
                ))
                .into());
            }
            Err(RecvTimeoutError::Disconnected) => bail!("the session with the coordinator ended"),
        }
    }
}

/// Builds the trainer for an assignment: config, device, threads, the
/// collective (formed from the id the coordinator hands out), the model.
fn assign(
    a: &Assignment,
    listener: &RingListener,
    threads: usize,
    abort: &AbortSlot,
    exchange: &mut dyn FnMut(Option<Vec<u8>>, Duration) -> Result<Vec<u8>>,
) -> Result<Trainer> {
    let config = Config::from_toml(&a.config_toml, "the job sent by the coordinator")?;
    let device = match config.worker.device {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda(ordinal) => cuda_device(ordinal)?,
    };
    let threads = if threads > 0 {
        threads
    } else {
        config.worker.threads
    };
    if threads > 0 {
        // Fails harmlessly if the pool already exists (a later generation).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    let peers: Vec<SocketAddr> = a
        .peers
        .iter()
        .map(|p| {
            (p.host.as_str(), p.port as u16)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| anyhow!("cannot resolve peer {}:{}", p.host, p.port))
        })
        .collect::<Result<_>>()?;
    let timeout = Duration::from_secs_f64(config.cluster.step_timeout_s);
    // The ring's own stall timeout outlasts the coordinator's patience (at
    // most step_timeout_s after the last heartbeat that showed progress):
    // the coordinator, which hears every rank, names the rank that stalled;
    // a survivor's collective error would only blame the peer it waits on.
    let collective_timeout = Duration::from_secs_f64(
        2.0 * config.cluster.step_timeout_s + 2.0 * config.cluster.heartbeat_interval_s,
    );
    tracing::info!(
        "rank {} of {}: device {}, {} threads, accumulation {}",
        a.rank,
        a.world_size,
        config.worker.device,
        rayon::current_num_threads(),
        a.accumulation
    );
    let mine = if a.rank == 0 {
        Some(collective::new_shared_id(&device)?)
    } else {
        None
    };
    let shared_id = exchange(mine, timeout)?;
    let collective = collective::form(
        &device,
        listener,
        &collective::Formation {
            rank: a.rank as usize,
            world: a.world_size as usize,
            peers: &peers,
            generation: a.generation,
            shared_id: &shared_id,
            timeout: collective_timeout,
        },
    )?;
    if let Ok(mut h) = abort.lock() {
        *h = collective.abort_handle();
    }
    let mut trainer = Trainer::new(&config, collective, a.accumulation as usize, device)?;
    tracing::info!(
        "rank {}: {} engine (worker.engine = {})",
        a.rank,
        trainer.engine_name(),
        String::from(config.worker.engine)
    );
    if !a.load_checkpoint.is_empty() {
        let dir = std::path::Path::new(&a.load_checkpoint);
        trainer
            .load_checkpoint(dir, a.weights_only)
            .with_context(|| format!("loading {}", dir.display()))?;
        tracing::info!(
            "loaded {} from {}",
            if a.weights_only {
                "weights"
            } else {
                "weights and optimizer state"
            },
            dir.display()
        );
    }
    Ok(trainer)
}

/// The GPU of `cuda:N`, or for plain `cuda` the local rank's GPU
/// (`LOCAL_RANK`, else 0: one GPU per pod in the Indexed Job).
#[cfg(feature = "cuda")]
fn cuda_device(ordinal: Option<usize>) -> Result<Device> {
    let ordinal = ordinal
        .or_else(|| {
            std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|r| r.parse().ok())
        })
        .unwrap_or(0);
    let device =
        Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
    tracing::info!(
        "using CUDA device {ordinal} (LOCAL_RANK={})",
        std::env::var("LOCAL_RANK").unwrap_or_else(|_| "unset".into())
    );
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: Option<usize>) -> Result<Device> {
    bail!(
        "worker.device asks for CUDA, but this worker was built without CUDA support; rebuild with `cargo build --release -p stride-worker --features cuda` (see deploy/Dockerfile.cuda), or run with --set worker.device=cpu"
    )
}
