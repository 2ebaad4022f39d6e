//! `--local`: the coordinator starts its own worker processes on this
//! machine (the laptop and CI path).
//!
//! Each worker runs `worker --connect URL --identity local-I` in its own
//! process group (so a Ctrl-C reaches only the coordinator, which then stops
//! the workers in order), with stdout/stderr in `worker-I.log` of the run
//! directory, and with the machine's cores divided among the workers
//! (`worker.threads`, else cores / workers) so N workers on few cores do not
//! thrash. Children are killed if the coordinator drops them; none outlives
//! a test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

#[derive(Debug)]
pub struct LocalWorkers {
    children: Vec<Option<Child>>,
    logs: Vec<PathBuf>,
    bin: PathBuf,
    url: String,
    threads: usize,
    token: String,
}

/// Where the `worker` binary is: `STRIDE_WORKER_BIN`, else next to this
/// executable.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STRIDE_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("cannot locate the coordinator executable")?;
    let p = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if !p.is_file() {
        bail!(
            "the worker binary is not at {} (next to the coordinator); build both with `cargo build --release` or set STRIDE_WORKER_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// Threads per local worker: `configured`, else the cores divided among them.
pub fn threads_per_worker(configured: usize, workers: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

impl LocalWorkers {
    pub fn spawn(
        count: usize,
        url: &str,
        threads: usize,
        run_dir: &Path,
        token: &str,
    ) -> Result<LocalWorkers> {
        let mut w = LocalWorkers {
            children: Vec::with_capacity(count),
            logs: (0..count)
                .map(|i| run_dir.join(format!("worker-{i}.log")))
                .collect(),
            bin: worker_binary()?,
            url: url.to_string(),
            threads,
            token: token.to_string(),
        };
        for i in 0..count {
            let child = w.start(i)?;
            w.children.push(Some(child));
        }
        Ok(w)
    }

    fn start(&self, i: usize) -> Result<Child> {
        let log_path = &self.logs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let err = log.try_clone().context("cannot duplicate a log handle")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--connect")
            .arg(&self.url)
            .arg("--identity")
            .arg(format!("local-{i}"))
            .arg("--threads")
            .arg(self.threads.to_string())
            // A local worker outliving its coordinator gives up soon.
            .arg("--connect-timeout")
            .arg("15")
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            .env(stride_job::auth::TOKEN_ENV, &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        cmd.spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))
    }

    /// Kills local worker `slot` if it still runs (e.g. frozen) and starts a
    /// fresh one in its place; returns the new process's pid.
    pub async fn restart(&mut self, slot: usize) -> Result<u32> {
        if let Some(Some(child)) = self.children.get_mut(slot) {
            let _ = child.kill().await;
        }
        let child = self.start(slot)?;
        let pid = child.id().unwrap_or(0);
        if let Some(c) = self.children.get_mut(slot) {
            *c = Some(child);
        }
        Ok(pid)
    }

    /// Resolves when a worker process exits on its own: its slot, pid,
    /// status and the tail of its log.
    pub async fn exited(&mut self) -> Exited {
        loop {
            for (slot, c) in self.children.iter_mut().enumerate() {
                if let Some(child) = c {
                    let pid = child.id().unwrap_or(0);
                    if let Ok(Some(status)) = child.try_wait() {
                        *c = None;
                        return Exited {
                            slot,
                            pid,
                            status,
                            log: format!(
                                "last lines of {}:\n{}",
                                self.logs[slot].display(),
                                tail(&self.logs[slot], 8)
                            ),
                        };
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `grace` for every worker to exit, then kills the rest.
    pub async fn stop(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for c in self.children.iter_mut() {
            if let Some(child) = c {
                if tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                *c = None;
            }
        }
    }
}

/// A local worker process that exited on its own.
#[derive(Debug)]
pub struct Exited {
    pub slot: usize,
    pub pid: u32,
    pub status: std::process::ExitStatus,
    /// The last lines of its log, introduced.
    pub log: String,
}

impl Exited {
    /// `local-N`, the identity it registered with.
    pub fn identity(&self) -> String {
        format!("local-{}", self.slot)
    }

    /// It said the job cannot work here (bad input, 2) or that the job
    /// failed (4): restarting it would not help.
    pub fn gave_up(&self) -> bool {
        matches!(
            self.status.code(),
            Some(stride_proto::exit::BAD_INPUT | stride_proto::exit::JOB_FAILED)
        )
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
