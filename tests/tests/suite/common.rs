//! Helpers for the end-to-end tests: find the built binaries, run them with
//! a deadline, read what they wrote. Every process a test starts is killed
//! when the test's handle drops, and every server listens on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Whole-job tests run two at a time on CI's two cores; the failure tests
/// measure heartbeats and step timeouts, which a neighbour's load would
/// distort, so each of them runs alone. Every test that starts processes
/// holds one of these turns for its duration.
static TURNS: RwLock<()> = RwLock::new(());

/// A turn with no other process-starting test running (failure tests).
pub fn alone() -> RwLockWriteGuard<'static, ()> {
    TURNS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A turn beside other tests that run beside others.
pub fn beside_others() -> RwLockReadGuard<'static, ()> {
    TURNS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The job token every test process gets through `STRIDE_TOKEN`.
pub const TOKEN: &str = "e2e-token";

/// A binary of this workspace, built next to the test executable
/// (`target/<profile>/deps/e2e-…` → `target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built; run the tests with `cargo test --workspace` (which builds every binary)",
        p.display()
    );
    if ["coordinator", "worker"].contains(&name) {
        has_test_hooks(&p);
    }
    p
}

/// Panics unless the binary at `p` was built with the test hooks (by
/// `cargo test`, not `cargo build`, which builds the same path without
/// them); asked once per binary.
fn has_test_hooks(p: &Path) {
    static CHECKED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|c| c == p) {
        return;
    }
    // `--help`: a binary without the hooks prints its help and exits.
    let out = Command::new(p)
        .arg("--help")
        .env(stride_job::test_hooks::PROBE, "1")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(stride_job::test_hooks::PROBE_ANSWER),
        "{} has no test hooks: it was built by `cargo build` since the last `cargo test --workspace`; run `cargo test --workspace` (which rebuilds it with them)",
        p.display()
    );
    checked.push(p.to_path_buf());
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit`; panics (after killing it) if it runs longer.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not finish within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts `coordinator ARGS` in `cwd`, output to `cwd/<log>`.
pub fn spawn(name: &str, args: &[&str], cwd: &Path, log: &str) -> Proc {
    spawn_env(name, args, cwd, log, &[])
}

/// [`spawn`] with extra environment variables (inherited by local workers).
pub fn spawn_env(name: &str, args: &[&str], cwd: &Path, log: &str, env: &[(&str, &str)]) -> Proc {
    let out = std::fs::File::create(cwd.join(log)).expect("log file");
    let err = out.try_clone().expect("log handle");
    let child = Command::new(bin(name))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env("STRIDE_TOKEN", TOKEN)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn");
    Proc {
        child,
        name: format!("{name} {}", args.join(" ")),
    }
}

/// Runs `coordinator ARGS` to completion within `limit`; returns the exit
/// status and its combined output.
pub fn run(args: &[&str], cwd: &Path, limit: Duration) -> (ExitStatus, String) {
    let mut p = spawn("coordinator", args, cwd, "coordinator.out");
    let status = p.wait(limit);
    let out = std::fs::read_to_string(cwd.join("coordinator.out")).unwrap_or_default();
    (status, out)
}

/// The objects of a run's metrics.jsonl.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Polls `f` until it returns Some, or panics after `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Worker pids the coordinator logged ("… joined (host, pid N, …)").
pub fn worker_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains(" joined ("))
        .filter_map(|l| l.split("pid ").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Whether a process is still alive (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The URL a coordinator started in `cwd` (run directory `runs/<run>`)
/// wrote to `coordinator.addr`; panics if it exits first.
pub fn coordinator_url(cwd: &Path, run: &str, coord: &mut Proc) -> String {
    let addr = cwd.join("runs").join(run).join("coordinator.addr");
    eventually(Duration::from_secs(60), "coordinator.addr", || {
        if let Ok(Some(status)) = coord.child.try_wait() {
            panic!("{} exited early ({status})", coord.name);
        }
        std::fs::read_to_string(&addr)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
}

/// Every file under `dir` with its sha256 (symlinks by target): equal
/// snapshots mean nothing was written, renamed or deleted.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("ls").flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            if meta.file_type().is_symlink() {
                out.insert(
                    p.clone(),
                    format!("-> {}", std::fs::read_link(&p).expect("link").display()),
                );
            } else if meta.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.clone(),
                    stride_job::checkpoint::sha256_file(&p).expect("sha"),
                );
            }
        }
    }
    out
}

/// A copy of checkpoint folder `from` at `to`, pointers and all (`cp -a`).
pub fn copy_folder(from: &Path, to: &Path) {
    let copied = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        copied.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}
