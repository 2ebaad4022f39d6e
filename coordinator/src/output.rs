//! What a user watches: the run directory, `train.log`, `metrics.jsonl`, the
//! console (a progress bar with ETA on a terminal, plain lines otherwise).
//!
//! `train.log` receives every log line the console shows (and the per-step
//! lines even when a progress bar replaces them on screen), so
//! `tail -f runs/<name>/train.log` works as the seed's `tail -f
//! training_1k.log` did. `metrics.jsonl` is one JSON object per step.
//! Earlier logs in a reused run directory are kept under a numbered name,
//! never overwritten.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Set once a run's logging (console + train.log) is active: errors then go
/// through `tracing` (and so into train.log) instead of plain stderr.
pub static RUN_LOGGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Target of the per-step log lines (hidden on the console while a progress
/// bar shows the same information).
pub const STEP_TARGET: &str = "stride::step";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsRecord {
    pub step: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub epoch: u64,
    /// Tokens trained on so far in this run (all ranks).
    pub tokens: u64,
    /// Wall time of this step, as seen by the coordinator.
    pub step_s: f64,
    /// Workers that took part.
    pub workers: usize,
    /// Seconds since the job started.
    pub elapsed_s: f64,
    /// Hash of the weights after the step (identical on every rank; the
    /// coordinator fails the job if they differ).
    pub weights_hash: String,
    /// sha256 (first 16 hex digits) of the step's global sample indices:
    /// equal digests mean the same samples in the same order.
    pub samples_digest: String,
    /// Bytes rank 0's step moved between host and device memory (token ids
    /// in and scalars out where the state is device-resident; 0 where it is
    /// host memory).
    pub host_device_bytes: u64,
    /// Seconds of communication the step waited for on its slowest rank
    /// in that (the gradient sums backward did not hide, a sharded
    /// optimizer's all-gather).
    pub comm_exposed_s: f64,
}

/// The run directory and its append-only files.
#[derive(Debug)]
pub struct RunDir {
    pub path: PathBuf,
    metrics: File,
    /// What [`RunDir::create`] repaired (a torn last line of
    /// `metrics.jsonl`), to be said once the log is open.
    pub repaired: Option<String>,
}

/// Cuts a torn last line (no newline: a write interrupted by a crash or a
/// full disk) off `metrics.jsonl`, so that the next line is not glued to
/// it; says what it cut.
fn repair_torn_line(path: &Path) -> Result<Option<String>> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(None);
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = String::from_utf8_lossy(&bytes[keep..]).into_owned();
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.set_len(keep as u64)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot repair {}", path.display()))?;
    let shown: String = torn.chars().take(80).collect();
    Ok(Some(format!(
        "{}: removed a torn last line left by an interrupted write ({} bytes: `{shown}…`)",
        path.display(),
        torn.len()
    )))
}

/// Moves `path` to `path.N` (first free N) if it exists.
fn keep_old(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for n in 1.. {
        let old = PathBuf::from(format!("{}.{n}", path.display()));
        if !old.exists() {
            std::fs::rename(path, &old)
                .with_context(|| format!("cannot move {} aside", path.display()))?;
            return Ok(());
        }
    }
    Ok(())
}

impl RunDir {
    /// Creates (or reuses) `path`; a fresh run moves earlier logs aside, a
    /// resumed run appends to them.
    pub fn create(path: &Path, fresh: bool) -> Result<RunDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        if fresh {
            keep_old(&path.join("metrics.jsonl"))?;
            keep_old(&path.join("train.log"))?;
        }
        let repaired = repair_torn_line(&path.join("metrics.jsonl"))?;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.join("metrics.jsonl"))
            .with_context(|| format!("cannot open {}", path.join("metrics.jsonl").display()))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            metrics,
            repaired,
        })
    }

    pub fn log_path(&self) -> PathBuf {
        self.path.join("train.log")
    }

    pub fn write_metrics(&mut self, record: &MetricsRecord) -> Result<()> {
        self.write_line(record)
    }

    /// A line that is not a step (e.g. `{"event": "resume", …}`).
    pub fn write_line(&mut self, record: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.metrics
            .write_all(line.as_bytes())
            .context("cannot append to metrics.jsonl")
    }
}

/// Exclusive hold on the folders a job writes (its run directory and its
/// checkpoint folder): a second coordinator on either is refused (an OS
/// file lock, released even on SIGKILL), with the holder's pid and host in
/// the message.
#[derive(Debug)]
pub struct RunLock {
    _files: Vec<File>,
}

impl RunLock {
    pub fn acquire(run_dir: &Path, checkpoints: &Path) -> Result<RunLock> {
        let mut files = vec![lock_file(run_dir, checkpoints)?];
        // The checkpoint folder is locked itself (its directory, so that
        // nothing is written into it: a refused resume changes nothing
        // there), unless it is the run directory.
        std::fs::create_dir_all(checkpoints)
            .with_context(|| format!("cannot create {}", checkpoints.display()))?;
        if !same_folder(run_dir, checkpoints) {
            let dir = File::open(checkpoints)
                .with_context(|| format!("cannot open {}", checkpoints.display()))?;
            if dir.try_lock().is_err() {
                return Err(crate::refused::Refused(format!(
                    "checkpoint folder {} is in use by another coordinator (its run directory's coordinator.lock names it); stop that job first, or give this one a run directory of its own (--run-dir DIR, with a relative checkpoint.dir)",
                    checkpoints.display()
                ))
                .into());
            }
            files.push(dir);
        }
        Ok(RunLock { _files: files })
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Locks `run_dir/coordinator.lock` (creating both) and writes who holds
/// it and which checkpoint folder it writes, or says who holds it.
fn lock_file(run_dir: &Path, checkpoints: &Path) -> Result<File> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    let path = run_dir.join("coordinator.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(crate::refused::Refused(format!(
            "run directory {} is in use by another coordinator ({}); stop it first, or use another --run-dir",
            run_dir.display(),
            holder.trim()
        ))
        .into());
    }
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "unknown host".into());
    file.set_len(0)?;
    write!(
        file,
        "pid {} on {}, checkpoints in {}",
        std::process::id(),
        host.trim(),
        std::path::absolute(checkpoints)
            .unwrap_or_else(|_| checkpoints.to_path_buf())
            .display()
    )?;
    Ok(file)
}

/// Console writer that clears the progress bar around each line.
#[derive(Clone, Debug)]
struct ConsoleWriter {
    bar: Option<ProgressBar>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for ConsoleWriter {
    type Writer = ConsoleWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[derive(Clone, Debug)]
struct FileWriter(Arc<Mutex<File>>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut f = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("log file lock poisoned"))?;
        f.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = FileWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Logging for the offline commands: stderr only.
pub fn init_console_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(stride_telemetry::log_filter())
        .try_init();
}

/// Logging for a training run: console (through the progress bar, if any),
/// `train.log`, and spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set. Returns the progress bar when stderr is a terminal, and the guard
/// that flushes the spans when dropped.
pub fn init_run_logging(
    log: &Path,
    max_steps: u64,
    job: &str,
) -> Result<(Option<ProgressBar>, stride_telemetry::Guard)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(max_steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {elapsed_precise} ETA {eta_precise}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let console_filter = {
        let f = stride_telemetry::log_filter();
        if bar.is_some() {
            f.add_directive(
                format!("{STEP_TARGET}=off")
                    .parse()
                    .context("bad log directive")?,
            )
        } else {
            f
        }
    };
    let console = tracing_subscriber::fmt::layer()
        .with_writer(ConsoleWriter { bar: bar.clone() })
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(console_filter);
    let to_file = tracing_subscriber::fmt::layer()
        .with_writer(FileWriter(Arc::new(Mutex::new(file))))
        .with_ansi(false)
        .with_target(false)
        .with_filter(stride_telemetry::log_filter());
    let (traces, guard) = stride_telemetry::otlp_layer(stride_telemetry::COORDINATOR_SERVICE, job)?;
    tracing_subscriber::registry()
        .with(console)
        .with(to_file)
        .with(traces)
        .try_init()
        .context("logging was already initialised")?;
    RUN_LOGGING.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(endpoint) = guard.endpoint() {
        tracing::info!("exporting traces over OTLP/gRPC to {endpoint}");
    }
    Ok((bar, guard))
}

use tracing_subscriber::Layer as _;
