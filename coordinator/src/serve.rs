//! Bringing the gRPC service up and down for a job: the listening socket,
//! TLS, the `coordinator.addr` file, the token check, the standard health
//! service with its watchdog (NOT_SERVING while the driver loop is stuck)
//! and the signals the driver hears as events.
//!
//! It owns no job logic: what the service says lives in `server.rs`, what
//! the job does in `driver/`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use stride_proto::v1::coordinator_server::CoordinatorServer;
use tokio::sync::mpsc::UnboundedSender;

use crate::server::{self, Event, Shared};

/// Default gRPC address without `--local` (torchrun's rendezvous port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:29400";

/// Where and how to serve.
#[derive(Debug)]
pub struct Listen<'a> {
    /// `--listen`; None: 127.0.0.1:0 with `--local`, else [`DEFAULT_LISTEN`].
    pub addr: Option<SocketAddr>,
    pub local: bool,
    pub tls_cert: Option<&'a Path>,
    pub tls_key: Option<&'a Path>,
    pub tls_client_ca: Option<&'a Path>,
    /// Where `coordinator.addr` goes (the run directory).
    pub addr_file_dir: Option<&'a Path>,
}

/// The running service; [`Serving::stop`] takes it down.
#[derive(Debug)]
pub struct Serving {
    /// The URL workers connect to.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    serve: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    watchdog: tokio::task::JoinHandle<()>,
}

impl Serving {
    pub async fn stop(self) {
        self.watchdog.abort();
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.serve).await;
    }
}

/// Binds, writes `coordinator.addr`, and serves the coordinator and
/// health services until [`Serving::stop`].
pub async fn start(listen: Listen<'_>, token: &str, shared: Arc<Shared>) -> Result<Serving> {
    let addr = match listen.addr {
        Some(a) => a,
        None if listen.local => SocketAddr::from(([127, 0, 0, 1], 0)),
        None => DEFAULT_LISTEN.parse().context("bad default address")?,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (is another coordinator running? pick another with --listen)"
        )
    })?;
    let bound = listener.local_addr()?;
    let tls = tls_config(&listen)?;
    if !bound.ip().is_loopback() && tls.is_none() {
        tracing::warn!(
            "listening on {bound} without TLS: the job token and all traffic cross the network in clear; pass --tls-cert and --tls-key"
        );
    }
    let url = format!("{}://{bound}", if tls.is_some() { "https" } else { "http" });
    if let Some(dir) = listen.addr_file_dir {
        let file = dir.join("coordinator.addr");
        stride_job::files::write_whole(&file, &format!("{url}\n"))
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    let service = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(server::Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(server::MAX_MESSAGE_BYTES),
        server::Authenticator::new(token),
    );
    // The standard gRPC health service answers Kubernetes probes without a
    // token: it reveals nothing but "serving" — or NOT_SERVING while the
    // driver loop has not gone round for `health_bound` (it wakes at least
    // every heartbeat interval, also while it waits), so a liveness probe
    // can restart a stuck coordinator.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    for name in ["", "stride.v1.Coordinator"] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    shared.driver_tick();
    let health_bound = server::health_bound(shared.heartbeat_interval.as_secs_f64());
    let watchdog = {
        let (shared, reporter) = (shared.clone(), health_reporter.clone());
        tokio::spawn(async move {
            let mut serving = true;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let now = shared.driver_idle() <= health_bound;
                if now != serving {
                    serving = now;
                    let status = if now {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tracing::error!(
                            "the driver loop has not gone round for {:.0} s: health says NOT_SERVING",
                            health_bound.as_secs_f64()
                        );
                        tonic_health::ServingStatus::NotServing
                    };
                    for name in ["", "stride.v1.Coordinator"] {
                        reporter.set_service_status(name, status).await;
                    }
                }
            }
        })
    };
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("bad TLS configuration")?;
    }
    let serve = tokio::spawn(
        builder
            .add_service(service)
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    Ok(Serving {
        url,
        stop,
        serve,
        watchdog,
    })
}

/// Turns Ctrl-C and SIGTERM into events the driver handles like any
/// other: a first SIGTERM is a preemption (finish the step, checkpoint,
/// exit 143); Ctrl-C or a second SIGTERM stops at once (130).
pub async fn forward_signals(events: UnboundedSender<Event>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            return;
        }
    };
    let mut preempting = false;
    loop {
        let which = tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        };
        if which == "SIGTERM" && !preempting {
            preempting = true;
            tracing::warn!(
                "SIGTERM: finishing the step in flight, checkpointing it, then stopping (exit {}); SIGTERM again or Ctrl-C stops at once",
                crate::driver::PREEMPTED_EXIT
            );
            let _ = events.send(Event::Preempt);
            continue;
        }
        let _ = events.send(Event::Interrupted(which));
        return;
    }
}

/// The server TLS configuration the flags ask for, if any.
fn tls_config(listen: &Listen<'_>) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (listen.tls_cert, listen.tls_key) else {
        return Ok(None);
    };
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
    );
    if let Some(ca) = listen.tls_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// A TLS file: regular files only (a FIFO would block the read).
fn read(p: &Path) -> Result<Vec<u8>> {
    stride_job::files::require_regular(p)?;
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
