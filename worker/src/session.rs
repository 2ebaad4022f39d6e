//! The worker's side of the gRPC contract: register, keep one session
//! stream, and turn the coordinator's plans into work for the compute
//! thread.
//!
//! Two threads of control: the async session (network, heartbeats) and one
//! blocking compute thread that owns the trainer (`compute.rs`) — so a long
//! step never delays a heartbeat. The session obeys; it never decides a
//! step, an LR or a sample.
//!
//! Forming a worker set: on an `Assignment` the compute thread picks the
//! device, rank 0 sends the collective's id (`CollectiveBootstrap`), every
//! rank waits for the coordinator to hand it back, joins the collective
//! (NCCL on CUDA, the TCP ring otherwise) and reports `Ready`.
//!
//! Stopping on its own (a panic on the compute thread, a failure retrying
//! cannot fix): the worker's last message says why, so it closes its side
//! of the session and waits — up to [`LAST_WORDS`] — for the coordinator to
//! answer (a `Shutdown`, or closing the stream) before the process exits.
//! Exiting at once could reset the connection with that message still
//! unsent, and the coordinator would report "connection lost" instead of
//! the cause.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use stride_job::config::Config;
use stride_job::tokens::{Corpus, Scan};
use stride_proto::client::TokenInterceptor;
use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{
    Heartbeat, Hello, RegisterRequest, WorkerError, WorkerMessage, coordinator_message,
    worker_message,
};
use stride_proto::{PROTOCOL_VERSION, exit};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;

use crate::collective::Bootstrap;
use crate::compute::{AbortSlot, Compute, Stop, Work, msg};
use crate::trainer::Signals;

/// This binary's version; the coordinator refuses any other.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// How long a worker that stops on its own waits for the coordinator to
/// acknowledge its last message before exiting anyway (a coordinator that
/// is itself gone must not hold it).
pub const LAST_WORDS: Duration = Duration::from_secs(5);

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

/// The coordinator refused this worker (a wrong token, another version)
/// or the job's data cannot be read here: bad input, exit code 2 — a
/// restart cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

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
    // Since when registrations have failed in transport (see
    // `Unreachable`); reset by a session that got further.
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        match run_session(&opts).await {
            Err(e) if e.is::<CoordinatorLost>() => {
                unreachable_since = None;
                tracing::warn!(
                    "{e:#}; reconnecting (for up to {:.0}s)",
                    opts.connect_timeout.as_secs_f64()
                );
            }
            Err(e) if e.is::<Unreachable>() => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= opts.connect_timeout {
                    return Err(e.context(format!(
                        "no coordinator at {} took the registration within --connect-timeout {:.0}s",
                        opts.url,
                        opts.connect_timeout.as_secs_f64()
                    )));
                }
                tracing::info!("{e:#}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// The registration failed in transport (the connection broke, or was
/// made to a coordinator that was dying, as right after a `kill -9` when
/// its restart is on the way): worth trying again within
/// `--connect-timeout`. A refusal (token, version) is final.
#[derive(Debug, thiserror::Error)]
#[error("the registration did not reach a coordinator: {0}")]
struct Unreachable(String);

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

    // The collective's bootstrap opens on the address this machine uses to
    // reach the coordinator.
    let bootstrap = Bootstrap::open(local_ip_towards(&opts.url).await?)?;
    let host = hostname();
    // The rank is not known yet (ranks are given when the worker set forms):
    // this span carries the identity instead.
    let span = tracing::info_span!("register", identity = %opts.identity, host = %host);
    let mut request = tonic::Request::new(RegisterRequest {
        version: VERSION.to_string(),
        protocol_version: PROTOCOL_VERSION,
        host: host.clone(),
        pid: std::process::id(),
        collective_host: bootstrap.host().to_string(),
        collective_port: u32::from(bootstrap.port()),
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
        .map_err(|s| {
            // A transport failure reaches us as Unavailable or as Unknown
            // with the transport error as its source.
            let transport = s.code() == tonic::Code::Unavailable
                || std::error::Error::source(&s).is_some_and(|e| e.is::<tonic::transport::Error>());
            if transport {
                anyhow::Error::from(Unreachable(s.message().to_string()))
            } else {
                Refused(format!(
                    "the coordinator refused registration: {}",
                    s.message()
                ))
                .into()
            }
        })?
        .into_inner();
    tracing::info!(
        "registered with coordinator {} as {} ({host}, pid {})",
        reg.coordinator_version,
        reg.worker_id,
        std::process::id()
    );

    // The job's data as this worker reads it: the coordinator refuses a
    // worker whose data differs before it takes part in anything.
    let config_toml = reg.config_toml.clone();
    let corpus = tokio::task::spawn_blocking(move || open_job_data(&config_toml))
        .await
        .map_err(|e| anyhow!("the data check stopped: {e}"))??;
    let data = corpus.as_ref().map_or_else(Vec::new, |(_, c)| {
        c.fingerprints().iter().map(crate::compute::wire).collect()
    });
    let (out_tx, out_rx) = mpsc::channel::<WorkerMessage>(64);
    out_tx
        .send(msg(worker_message::Body::Hello(Hello {
            worker_id: reg.worker_id.clone(),
            data,
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
                        Compute::new(work_rx, tx, bootstrap, threads, signals, abort, generation)
                            .with_corpus(corpus)
                            .run()
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
                        let generation = generation.load(Ordering::Relaxed);
                        let _ = tx.blocking_send(msg(worker_message::Body::Error(WorkerError {
                            generation,
                            message: message.clone(),
                            fatal: false,
                            collective_peer: None,
                        })));
                        Some(Stop {
                            why: message,
                            code: exit::FAILED,
                            stale_after: Some(generation),
                        })
                    }
                };
                let _ = stopped_tx.send(why);
            })
            .context("cannot start the compute thread")?
    };
    drop(out_tx);

    // The newest generation the coordinator has ended (aborted, or
    // replaced by assigning a newer one).
    let mut ended = 0u64;
    let code = loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            stop = &mut stopped => {
                let stop = stop.ok().flatten().unwrap_or(Stop {
                    why: "the compute thread stopped".into(),
                    code: exit::FAILED,
                    stale_after: None,
                });
                beat.abort();
                tracing::error!("{}; this worker stops (exit {})", stop.why, stop.code);
                eprintln!("error: {}; this worker stops (exit {})", stop.why, stop.code);
                // The heartbeat task and the compute thread held the last
                // senders: the outbound stream now ends after the message
                // that says why.
                drop(beat);
                // A report about a generation the coordinator has already
                // ended is ignored there: nothing to wait for.
                if stop.stale_after.is_none_or(|g| g > ended) {
                    last_words(&mut inbound, stop.stale_after).await;
                }
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
            Some(coordinator_message::Body::Assignment(a)) => {
                ended = ended.max(a.generation.saturating_sub(1));
                send_work(&work_tx, Work::Assign(a))?
            }
            Some(coordinator_message::Body::Step(p)) => send_work(&work_tx, Work::Step(p))?,
            Some(coordinator_message::Body::Eval(p)) => send_work(&work_tx, Work::Eval(p))?,
            Some(coordinator_message::Body::Checkpoint(p)) => {
                send_work(&work_tx, Work::Checkpoint(p))?
            }
            Some(coordinator_message::Body::Shutdown(s)) => {
                if matches!(s.exit_code, exit::BAD_INPUT | exit::JOB_FAILED) {
                    tracing::error!("coordinator: {} (exit {})", s.reason, s.exit_code);
                    eprintln!("error: {} (exit {})", s.reason, s.exit_code);
                } else {
                    tracing::info!("coordinator: {}", s.reason);
                }
                signals.cancel.store(true, Ordering::Relaxed);
                break s.exit_code;
            }
            Some(coordinator_message::Body::Abort(a)) => {
                ended = ended.max(a.generation);
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

/// Waits until the coordinator answers the worker's last message — a
/// `Shutdown`, its side of the session ending, a new `Assignment` (it has
/// moved on to a new worker set), or, for a report that was not fatal, an
/// `Abort` of its generation or a later one (the coordinator ignores the
/// report from then on) — or [`LAST_WORDS`] pass. Reading meanwhile also
/// leaves nothing unread, so the connection closes cleanly, not by reset.
async fn last_words(
    inbound: &mut tonic::Streaming<stride_proto::v1::CoordinatorMessage>,
    stale_after: Option<u64>,
) {
    let acknowledged = async {
        while let Ok(Some(m)) = inbound.message().await {
            match m.body {
                Some(
                    coordinator_message::Body::Shutdown(_)
                    | coordinator_message::Body::Assignment(_),
                ) => return,
                Some(coordinator_message::Body::Abort(a))
                    if stale_after.is_some_and(|g| a.generation >= g) =>
                {
                    return;
                }
                _ => {}
            }
        }
    };
    if tokio::time::timeout(LAST_WORDS, acknowledged)
        .await
        .is_err()
    {
        tracing::warn!(
            "the coordinator did not answer within {} s; exiting anyway",
            LAST_WORDS.as_secs()
        );
    }
}

/// Opens the data of the job the coordinator described at registration
/// (its config as TOML), and fingerprints it: `None` when it sent no
/// config (a finished job). A config or data that cannot be read here is
/// [`Refused`] (bad input for this worker).
fn open_job_data(config_toml: &str) -> Result<Option<(Config, Corpus)>> {
    if config_toml.is_empty() {
        return Ok(None);
    }
    let refused = |e: &dyn std::fmt::Display| Refused(format!("the job cannot run here: {e}"));
    let config = Config::from_toml(config_toml, "the job sent by the coordinator")
        .map_err(|e| refused(&e))?;
    // A driver too old for this build's PTX fails every launch: say so
    // now, once, instead of at the first kernel of every assignment.
    #[cfg(feature = "cuda")]
    if matches!(config.worker.device, stride_job::config::Device::Cuda(_)) {
        stride_cuda_kernels::gpu::require_driver_for_ptx(
            "this worker's CUDA kernels (Candle's and the fused AdamW)",
        )
        .map_err(|e| refused(&e.message))?;
    }
    let corpus = Corpus::open(&config.data, &config.model, config.train.seed, Scan::Layout)
        .map_err(|e| refused(&e))?;
    corpus.fingerprints();
    Ok(Some((config, corpus)))
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
