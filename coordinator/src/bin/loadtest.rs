//! `loadtest`: the control plane under several hundred workers.
//!
//!     cargo run --release -p stride-coordinator --bin loadtest -- --workers 300 --steps 300
//!
//! Starts a real `coordinator` (next to this binary) on 127.0.0.1 and
//! registers `--workers` simulated workers in this process: each has its own
//! gRPC connection, sends heartbeats, and answers every plan at once with a
//! fake report (no model, no collective). Prints the coordinator's per-step
//! round trip (plan out to the last report in, from metrics.jsonl) as p50
//! and p99, and its resident memory early and late in the run; exits
//! non-zero if memory grew by more than half between the two.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use stride_proto::PROTOCOL_VERSION;
use stride_proto::client::TokenInterceptor;
use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{
    CheckpointReport, CollectiveBootstrap, EvalReport, Heartbeat, Hello, Ready, RegisterRequest,
    StepReport, WorkerMessage, coordinator_message, worker_message,
};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 300)]
    workers: usize,
    #[arg(long, default_value_t = 300)]
    steps: u64,
}

const TOKEN: &str = "loadtest";

/// What simulated rank 0 sends as its collective id (the size of NCCL's).
const FAKE_ID: [u8; 128] = [0x5a; 128];

fn msg(body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

async fn fake_worker(url: String, i: usize) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = CoordinatorClient::with_interceptor(channel, TokenInterceptor::new(TOKEN)?);
    let reg = client
        .register(RegisterRequest {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            host: "loadtest".into(),
            pid: i as u32,
            collective_host: "127.0.0.1".into(),
            collective_port: 1,
            device: "none".into(),
            identity: format!("sim-{i}"),
        })
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // Simulated workers read no data: they report none (not checked).
    tx.send(msg(worker_message::Body::Hello(Hello {
        worker_id: reg.worker_id,
        data: Vec::new(),
    })))
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let beat = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut t =
                tokio::time::interval(Duration::from_millis(u64::from(reg.heartbeat_interval_ms)));
            loop {
                t.tick().await;
                if tx
                    .send(msg(worker_message::Body::Heartbeat(Heartbeat::default())))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    while let Some(m) = inbound.message().await? {
        let reply = match m.body {
            // The collective bootstrap with a fake NCCL-sized id: rank 0
            // sends it, every rank must get exactly those bytes back before
            // it reports Ready.
            Some(coordinator_message::Body::Assignment(a)) if a.rank == 0 => {
                worker_message::Body::Bootstrap(CollectiveBootstrap {
                    generation: a.generation,
                    unique_id: FAKE_ID.to_vec(),
                })
            }
            Some(coordinator_message::Body::Bootstrap(b)) => {
                anyhow::ensure!(
                    b.unique_id == FAKE_ID,
                    "the coordinator handed out a collective id that rank 0 did not send"
                );
                worker_message::Body::Ready(Ready {
                    generation: b.generation,
                    parameter_layout_hash: vec![1],
                    weights_hash: vec![2],
                    parameter_count: 1,
                    // A simulated worker reads no data (the check is skipped).
                    data: Vec::new(),
                })
            }
            Some(coordinator_message::Body::Step(p)) => worker_message::Body::Step(StepReport {
                generation: p.generation,
                step: p.step,
                loss: 1.0,
                grad_norm: 1.0,
                tokens: p.samples.len() as u64,
                weights_hash: if p.hash_weights { vec![3] } else { Vec::new() },
                ..Default::default()
            }),
            Some(coordinator_message::Body::Eval(p)) => worker_message::Body::Eval(EvalReport {
                generation: p.generation,
                step: p.step,
                loss_sum: p.samples.len() as f64,
                tokens: p.samples.len() as u64,
            }),
            Some(coordinator_message::Body::Checkpoint(p)) if p.write => {
                worker_message::Body::Checkpoint(CheckpointReport {
                    generation: p.generation,
                    step: p.step,
                    sha256: [("model.safetensors", "0"), ("optimizer.safetensors", "0")]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    write_s: 0.0,
                    weights_hash: vec![3],
                    error: String::new(),
                })
            }
            Some(coordinator_message::Body::Shutdown(_)) => break,
            _ => continue,
        };
        tx.send(msg(reply)).await?;
    }
    beat.abort();
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn steps_done(metrics: &std::path::Path) -> usize {
    std::fs::read_to_string(metrics).map_or(0, |t| t.lines().count())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let bin = std::env::current_exe()?.with_file_name("coordinator");
    let n = a.workers.to_string();
    let sets = [
        format!("train.global_batch={n}"),
        "train.micro_batch=1".into(),
        format!("train.max_steps={}", a.steps),
        "train.warmup_steps=0".into(),
        "train.eval_interval=0".into(),
        "train.eval_batches=1".into(),
        "checkpoint.interval=0".into(),
        "cluster.startup_timeout_s=300".into(),
        "cluster.heartbeat_timeout_s=60".into(),
    ];
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args([
        "--config",
        "tiny",
        "--workers",
        &n,
        "--listen",
        "127.0.0.1:0",
    ])
    .current_dir(dir.path())
    .env("STRIDE_TOKEN", TOKEN)
    .env("RUST_LOG", "warn")
    .kill_on_drop(true)
    .stdout(std::process::Stdio::null());
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let mut coord = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = coord.id().unwrap_or(0);
    let run: PathBuf = dir.path().join("runs/tiny");
    let url = loop {
        if let Ok(s) = std::fs::read_to_string(run.join("coordinator.addr"))
            && !s.trim().is_empty()
        {
            break s.trim().to_string();
        }
        if let Some(status) = coord.try_wait()? {
            bail!("the coordinator exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let workers: Vec<_> = (0..a.workers)
        .map(|i| tokio::spawn(fake_worker(url.clone(), i)))
        .collect();
    let metrics = run.join("metrics.jsonl");
    let (mut early, mut late) = (0, 0);
    while coord.try_wait()?.is_none() {
        let done = steps_done(&metrics) as u64;
        if done >= a.steps / 4 && early == 0 {
            early = rss_kib(pid);
        }
        if done + 5 >= a.steps && early > 0 {
            late = late.max(rss_kib(pid));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in workers {
        w.await?.context("a simulated worker failed")?;
    }
    let mut step_ms: Vec<f64> = std::fs::read_to_string(&metrics)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step_s"].as_f64())
        .map(|s| s * 1e3)
        .collect();
    anyhow::ensure!(
        step_ms.len() as u64 == a.steps,
        "only {} steps ran",
        step_ms.len()
    );
    step_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| step_ms[((step_ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{} simulated workers, {} steps: control-plane round trip per step p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; coordinator RSS {} MiB after 1/4 of the steps, {} MiB at the end",
        a.workers,
        a.steps,
        pct(0.5),
        pct(0.99),
        step_ms[step_ms.len() - 1],
        early / 1024,
        late / 1024
    );
    // Both samples must exist: a run too fast to sample (or a coordinator
    // whose memory could not be read) proves nothing.
    if early == 0 || late == 0 {
        bail!(
            "the coordinator's memory was not sampled (after 1/4 of the steps: {early} KiB, at the end: {late} KiB); run more steps"
        );
    }
    if late > early + early / 2 {
        bail!("coordinator memory grew from {early} KiB to {late} KiB: not bounded");
    }
    Ok(())
}
