//! `worker`: joins a Stride job. `worker --connect http://HOST:PORT` is all
//! it needs: the coordinator sends its rank, the whole resolved job and its
//! peers. Exit codes: `stride_proto::exit` (0 done, 1 failed, 2 bad input,
//! 3 removed — a replacement may join, 4 the job failed).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use stride_proto::exit;
use stride_worker::session::{self, Options};

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Stride worker: trains its share of a job driven by a coordinator",
    long_about = "Stride worker: trains its share of a job driven by a coordinator.\n\n\
        `worker --connect URL` joins a job; `worker sample --checkpoint CKPT --prompt TEXT` \
        continues a text with a checkpoint's model.",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The coordinator's gRPC URL, e.g. http://127.0.0.1:29400.
    #[arg(long, required = true)]
    connect: Option<String>,
    /// A stable name for this worker (ranks are given in its natural order);
    /// default: the Indexed Job's completion index, else host-pid.
    #[arg(long, env = "STRIDE_WORKER_IDENTITY")]
    identity: Option<String>,
    /// CPU threads for compute [default: the job's worker.threads, else all cores].
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=stride_job::config::MAX_THREADS as u64))]
    threads: usize,
    /// File holding the shared job token [default: $STRIDE_TOKEN].
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// Trust this CA (PEM) for an https:// coordinator.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Server name to verify in the coordinator's certificate [default: the URL's host].
    #[arg(long)]
    tls_domain: Option<String>,
    /// Check the flags and the token, print what would run, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Keep trying to reach the coordinator for this many seconds.
    #[arg(long, default_value_t = 120.0, value_parser = seconds)]
    connect_timeout: f64,
    /// Serve the standard gRPC health service on this address (e.g.
    /// 0.0.0.0:29401) for a liveness probe: a frozen worker stops
    /// answering, so Kubernetes replaces its pod.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Continue a prompt with a checkpoint's model (the fused CPU engine the
    /// workers train with); prints the continuation.
    Sample(SampleArgs),
}

#[derive(Debug, clap::Args)]
struct SampleArgs {
    /// A step directory, `…/best`, `…/latest`, a checkpoint folder or a run
    /// directory.
    #[arg(long)]
    checkpoint: std::path::PathBuf,
    /// Text to continue (GPT-2 BPE; for a model with GPT-2's vocabulary).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Token ids to continue, comma-separated (any vocabulary, e.g. `tiny`'s).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// New tokens to generate.
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    tokens: usize,
    /// Softmax temperature; 0 takes the most likely token (greedy).
    #[arg(long, default_value_t = 0.8, value_parser = temperature)]
    temperature: f64,
    /// Draw among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    /// Seed of the draws: the same seed gives the same text.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Print the logits after the prompt (its last position) as a JSON
    /// list instead of sampling (to compare with another implementation,
    /// e.g. bench/hf_export.py).
    #[arg(long)]
    logits: bool,
}

/// A temperature: finite, in 0..=100.
fn temperature(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is outside 0..=100"))
    }
}

/// `worker sample`: prints the prompt's continuation (exit 2 for a request
/// the checkpoint cannot serve).
fn sample(a: SampleArgs) -> ExitCode {
    use stride_worker::sample::{BadRequest, Prompt, Request, Sampler};
    let prompt = match (a.prompt, a.prompt_ids) {
        (Some(text), _) => Prompt::Text(text),
        (None, Some(ids)) => Prompt::Ids(ids),
        (None, None) => Prompt::Ids(Vec::new()),
    };
    let request = Request {
        checkpoint: a.checkpoint,
        prompt,
        tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    if a.logits {
        let run = || -> anyhow::Result<String> {
            let mut s = Sampler::open(&request.checkpoint)?;
            let ids = s.prompt_ids(&request.prompt)?;
            let logits = s.next_logits(&ids)?;
            Ok(format!(
                "[{}]",
                logits
                    .iter()
                    .map(|l| format!("{l:e}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
        };
        return match run() {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(exit::BAD_INPUT as u8)
            }
        };
    }
    let run = || -> anyhow::Result<stride_worker::sample::Sampled> {
        Sampler::open(&request.checkpoint)?.sample(&request)
    };
    match run() {
        Ok(s) => {
            match &s.text {
                Some(text) => println!("{text}"),
                None => {
                    let ids: Vec<String> = s.tokens[s.prompt_len..]
                        .iter()
                        .map(u32::to_string)
                        .collect();
                    println!("{}", ids.join(","));
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let bad = e.chain().any(|c| {
                c.is::<BadRequest>()
                    || c.is::<stride_job::checkpoint::CheckpointError>()
                    || c.is::<stride_job::ConfigError>()
            });
            ExitCode::from(if bad { exit::BAD_INPUT } else { exit::FAILED } as u8)
        }
    }
}

fn main() -> ExitCode {
    stride_job::test_hooks::answer_probe();
    // Before anything allocates: see stride_worker::alloc.
    stride_worker::alloc::tune_malloc();
    // In the CUDA image: check the CUDA build can start here, then become it.
    #[cfg(not(feature = "cuda"))]
    if let Err(e) =
        stride_worker::handoff::hand_over(&std::env::args_os().skip(1).collect::<Vec<_>>())
    {
        eprintln!("error: {e}");
        return ExitCode::from(exit::BAD_INPUT as u8);
    }
    let cli = Cli::parse();
    if let Some(Command::Sample(a)) = cli.command {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(stride_telemetry::log_filter())
            .try_init();
        return sample(a);
    }
    let Some(connect) = cli.connect.clone() else {
        eprintln!("error: --connect URL is required");
        return ExitCode::from(exit::BAD_INPUT as u8);
    };
    let identity =
        cli.identity
            .clone()
            .unwrap_or_else(|| match std::env::var("JOB_COMPLETION_INDEX") {
                Ok(i) => format!("index-{i}"),
                Err(_) => format!("pid-{}", std::process::id()),
            });
    // Dropped last: flushes the spans not yet exported.
    let _traces = match init_logging(&identity) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::BAD_INPUT as u8);
        }
    };
    if cli.dry_run {
        println!(
            "dry run: would join {} as {identity} (token from {})",
            connect,
            cli.token_file.as_ref().map_or_else(
                || format!("${}", stride_job::auth::TOKEN_ENV),
                |p| p.display().to_string()
            )
        );
        return ExitCode::SUCCESS;
    }
    let token = match stride_job::auth::load(cli.token_file.as_deref()) {
        Ok(Some(t)) => t,
        Ok(None) => {
            eprintln!("error: {}", stride_job::auth::TokenError::Missing);
            return ExitCode::from(exit::BAD_INPUT as u8);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::BAD_INPUT as u8);
        }
    };
    let tls = match tls_config(&cli, &connect) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::BAD_INPUT as u8);
        }
    };
    let opts = Options {
        tls,
        token,
        url: connect,
        identity,
        threads: cli.threads,
        connect_timeout: Duration::from_secs_f64(cli.connect_timeout),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let health_listen = cli.health_listen;
    let run = async move {
        if let Some(addr) = health_listen {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: --health-listen {addr}: {e}; pick a free port");
                    return Ok(exit::BAD_INPUT);
                }
            };
            tokio::spawn(serve_health(listener));
        }
        tokio::spawn(outlast_first_sigterm());
        session::run(opts).await
    };
    match runtime.block_on(run) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            // A refusal (token, version, data) is bad input: retrying the
            // same worker cannot help (the README's exit-code table).
            if e.chain().any(|c| c.is::<session::Refused>()) {
                ExitCode::from(exit::BAD_INPUT as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A first SIGTERM does not end the worker: when a whole job is preempted
/// (a node drain, `kubectl delete`), every pod gets SIGTERM at once, and
/// the coordinator needs its workers to finish the step in flight and
/// write the checkpoint it then asks for; it stops them with `Shutdown`
/// (exit 3) when that is done. A second SIGTERM ends the worker at once
/// (exit 143), as does the kubelet's SIGKILL at the end of the grace
/// period.
async fn outlast_first_sigterm() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::warn!("cannot watch SIGTERM: the worker will stop at the first one");
        return;
    };
    if term.recv().await.is_none() {
        return;
    }
    tracing::warn!(
        "SIGTERM: staying until the coordinator stops this job (it checkpoints first when it got SIGTERM too); SIGTERM again stops this worker at once"
    );
    if term.recv().await.is_some() {
        tracing::warn!("second SIGTERM: stopping now (exit 143)");
        std::process::exit(143);
    }
}

/// The standard gRPC health service, SERVING while this process's async
/// runtime runs: it answers nothing when the process is frozen or its
/// runtime is stuck, which is what a liveness probe needs to see. (A
/// compute thread that hangs while the rest lives is the coordinator's to
/// name, through its step timeout.)
async fn serve_health(listener: tokio::net::TcpListener) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await;
    if let Err(e) = served {
        tracing::error!("the health service stopped: {e}");
    }
}

/// A `--…-timeout` value that is not a number of seconds a `Duration` can
/// hold.
#[derive(Debug, thiserror::Error)]
enum BadSeconds {
    #[error("`{0}` is not a number of seconds")]
    NotANumber(String),
    #[error("{0} s is outside 0..=1000000")]
    OutOfRange(String),
}

/// A number of seconds a `Duration` can hold: finite, in 0..=1,000,000.
fn seconds(s: &str) -> Result<f64, BadSeconds> {
    let v: f64 = s
        .parse()
        .map_err(|_| BadSeconds::NotANumber(s.to_string()))?;
    if v.is_finite() && (0.0..=stride_job::config::MAX_SECONDS).contains(&v) {
        Ok(v)
    } else {
        Err(BadSeconds::OutOfRange(s.to_string()))
    }
}

/// Logs to stderr; spans also over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set (see `stride_telemetry`).
fn init_logging(identity: &str) -> anyhow::Result<stride_telemetry::Guard> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(stride_telemetry::log_filter());
    let (traces, guard) = stride_telemetry::otlp_layer(stride_telemetry::WORKER_SERVICE, identity)?;
    tracing_subscriber::registry()
        .with(console)
        .with(traces)
        .try_init()?;
    Ok(guard)
}

/// The client TLS configuration the flags ask for: for an https:// URL,
/// the system roots plus --tls-ca, and a client identity for mutual TLS.
fn tls_config(
    cli: &Cli,
    connect: &str,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    if !connect.starts_with("https://") {
        if cli.tls_ca.is_some() || cli.tls_cert.is_some() {
            anyhow::bail!("--tls-* flags need an https:// coordinator URL, not {connect}");
        }
        return Ok(None);
    }
    let identity = cli.tls_cert.as_deref().zip(cli.tls_key.as_deref());
    Ok(Some(stride_proto::client::client_tls(
        cli.tls_ca.as_deref(),
        identity,
        cli.tls_domain.as_deref(),
    )?))
}
