//! Failures with real processes: a worker killed with SIGKILL or frozen
//! with SIGSTOP is named and replaced and the job ends with the same weights
//! as an uninterrupted run; a killed coordinator is restarted and its
//! workers rejoin; a second coordinator on a live run is refused.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Proc, eventually, metrics, run, spawn, spawn_env, worker_pids};
use stride_job::checkpoint;
use stride_job::test_hooks::Hook;

pub(crate) const LIMIT: Duration = Duration::from_secs(300);

/// tiny for 60 steps, a checkpoint every 20, evaluation every 25.
pub(crate) const JOB: &[&str] = &[
    "--config",
    "tiny",
    "--workers",
    "2",
    "--set",
    "train.max_steps=60",
    "--set",
    "train.warmup_steps=10",
    "--set",
    "checkpoint.interval=20",
    "--set",
    "train.eval_interval=25",
];

pub(crate) fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = JOB.to_vec();
    v.extend_from_slice(extra);
    v
}

/// sha256 of the final model and optimizer files of a run in `dir`.
pub(crate) fn final_state(dir: &Path) -> (String, String) {
    let s = checkpoint::validate(&dir.join("runs/tiny/checkpoints/step-00000060"))
        .expect("final checkpoint")
        .state;
    (
        s.files[checkpoint::MODEL_FILE].clone(),
        s.files[checkpoint::OPTIMIZER_FILE].clone(),
    )
}

pub(crate) fn reference() -> (String, String) {
    let d = tempfile::tempdir().expect("tmp");
    let (status, out) = run(&with(&["--local"]), d.path(), LIMIT);
    assert!(status.success(), "{out}");
    final_state(d.path())
}

pub(crate) fn steps_done(dir: &Path) -> usize {
    metrics(&dir.join("runs/tiny"))
        .iter()
        .filter(|r| r.get("loss").is_some())
        .count()
}

pub(crate) fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// A small seeded generator for "random" steps and victims; the seed is
/// printed so that a failure can be replayed.
fn seed() -> u64 {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("failure-test seed {s}");
    s
}

fn next(state: &mut u64, below: u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 33) % below
}

/// The live pid of each local worker: the last "worker local-N joined (…,
/// pid P" line per identity.
pub(crate) fn current_workers(dir: &Path) -> Vec<u32> {
    let log = std::fs::read_to_string(dir.join("runs/tiny/train.log")).unwrap_or_default();
    let mut by_identity = std::collections::BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(" joined (")) {
        let identity = line
            .split("worker ")
            .nth(1)
            .and_then(|r| r.split(' ').next());
        let pid = worker_pids(line).first().copied();
        if let (Some(identity), Some(pid)) = (identity, pid) {
            by_identity.insert(identity.to_string(), pid);
        }
    }
    by_identity.into_values().collect()
}

#[test]
fn killed_and_frozen_workers_are_named_replaced_and_change_nothing() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = reference();
    let mut rng = seed();

    // Three failures in one run (chaos): a SIGKILL during the evaluation
    // after step 24, a SIGKILL while the checkpoint of step 40 is being
    // written (when the timing allows: its temporary directory is watched),
    // and a SIGSTOP at a random step. Each victim is a random worker.
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&["--local", "--set", "cluster.max_restarts=5"]),
        d.path(),
        "c.out",
    );
    let ckpt = d.path().join("runs/tiny/checkpoints");
    let writing = |step: u64| {
        std::fs::read_dir(&ckpt)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".tmp-step-{step:08}"))
            })
    };
    for (n, action) in ["-9", "-9", "-STOP"].into_iter().enumerate() {
        match n {
            0 => {
                eventually(LIMIT, "step 24", || {
                    (steps_done(d.path()) >= 24).then_some(())
                });
                std::thread::sleep(Duration::from_millis(150)); // step 24 done, evaluating
            }
            1 => {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !writing(40) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            _ => {
                let now = steps_done(d.path());
                let at = now + 2 + next(&mut rng, 6) as usize;
                eventually(LIMIT, "training progress", || {
                    (steps_done(d.path()) >= at).then_some(())
                });
            }
        }
        let victims = current_workers(d.path());
        let victim = victims[next(&mut rng, victims.len() as u64) as usize];
        println!(
            "{action} worker {victim} after {} step lines",
            steps_done(d.path())
        );
        signal(action, victim);
        // Wait for the coordinator to notice before the next failure.
        let restarts = round_restarts(d.path());
        eventually(LIMIT, "a restart", || {
            (round_restarts(d.path()) > restarts).then_some(())
        });
    }
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    assert!(out.contains("lost at step"), "{out}");
    assert!(
        out.contains("no heartbeat for"),
        "the frozen worker must be named: {out}"
    );
    assert!(out.contains("restart 3/5"), "{out}");
    assert_eq!(
        final_state(d.path()),
        want,
        "after three failures the weights differ from the uninterrupted run"
    );
}

pub(crate) fn round_restarts(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs/tiny/train.log"))
        .unwrap_or_default()
        .matches(" restart ")
        .count()
}

#[test]
fn exhausted_restarts_fail_with_a_summary() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&["--local", "--set", "cluster.max_restarts=0"]),
        d.path(),
        "c.out",
    );
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= 5).then_some(())
    });
    signal("-9", current_workers(d.path())[0]);
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("giving up after 0 restart(s)")
            && out.contains("Failures:")
            && out.contains("lost at step"),
        "{out}"
    );
}

/// A free port *below* the kernel's ephemeral range, for a coordinator
/// that must bind the same port again after a restart: a port-0 bind or an
/// outgoing connection of any other process can take an ephemeral port in
/// the gap between the kill and the restart (that made this test flaky on
/// a loaded machine), but never one outside the range.
pub(crate) fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            r.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let start = 10_000 + (std::process::id() as u16 % span);
    (0..span)
        .map(|i| 10_000 + (start - 10_000 + i) % span)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

#[test]
fn a_killed_coordinator_is_restarted_and_its_workers_rejoin() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = reference();
    let d = tempfile::tempdir().expect("tmp");
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let mut coord = spawn(
        "coordinator",
        &with(&["--listen", &listen]),
        d.path(),
        "c1.out",
    );
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            spawn(
                "worker",
                &["--connect", &url, "--connect-timeout", "60"],
                d.path(),
                &format!("w{i}.out"),
            )
        })
        .collect();
    let ckpt = d
        .path()
        .join("runs/tiny/checkpoints/step-00000020/COMPLETE");
    eventually(LIMIT, "the first checkpoint", || {
        ckpt.exists().then_some(())
    });
    signal("-9", coord.pid());
    coord.wait(Duration::from_secs(30));

    // A second coordinator on the same run directory while the first is alive
    // is refused; here the first is dead, so the restart may take over.
    let mut again = spawn(
        "coordinator",
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--listen",
            &listen,
        ],
        d.path(),
        "c2.out",
    );
    let status = again.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c2.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    for (i, mut w) in workers.into_iter().enumerate() {
        let s = w.wait(Duration::from_secs(60));
        let wout = std::fs::read_to_string(d.path().join(format!("w{i}.out"))).unwrap_or_default();
        assert!(s.success(), "worker {i}: {wout}");
        assert!(
            wout.contains("lost the coordinator") && wout.contains("reconnecting"),
            "{wout}"
        );
    }
    assert_eq!(
        final_state(d.path()),
        want,
        "the restarted job ended with other weights"
    );
}

/// A registration that fails in transport (the connection is accepted and
/// dropped, as by a coordinator dying under `kill -9` while its restart is
/// on the way) is tried again until --connect-timeout, not taken for a
/// refusal: before, a worker that reconnected in that instant exited, and
/// the restarted coordinator waited for it in vain.
#[test]
fn a_registration_lost_in_transport_is_tried_again() {
    let _turn = crate::common::beside_others();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let d = tempfile::tempdir().expect("tmp");
    let url = format!("http://127.0.0.1:{port}");
    let mut w = spawn(
        "worker",
        &["--connect", &url, "--connect-timeout", "2"],
        d.path(),
        "w.out",
    );
    let status = w.wait(Duration::from_secs(60));
    let out = std::fs::read_to_string(d.path().join("w.out")).unwrap_or_default();
    assert!(!status.success(), "{out}");
    assert!(out.contains("trying again"), "{out}");
    assert!(
        out.contains(&format!(
            "no coordinator at {url} took the registration within --connect-timeout 2s"
        )),
        "{out}"
    );
}

#[test]
fn a_second_coordinator_on_a_live_run_is_refused() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    let mut first = spawn(
        "coordinator",
        &["--config", "tiny", "--listen", "127.0.0.1:0"],
        d.path(),
        "c1.out",
    );
    let addr = d.path().join("runs/tiny/coordinator.addr");
    eventually(Duration::from_secs(60), "the first coordinator", || {
        addr.exists().then_some(())
    });
    let (status, out) = run(
        &["--config", "tiny", "--listen", "127.0.0.1:0"],
        d.path(),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("is in use by another coordinator")
            && out.contains(&format!("pid {}", first.pid())),
        "{out}"
    );
    assert!(
        first.child.try_wait().expect("wait").is_none(),
        "the first coordinator must be unharmed"
    );
}

/// Two jobs with their own run directories but one checkpoint folder (an
/// absolute `checkpoint.dir`) would commit and prune each other's
/// checkpoints: the second is refused, exit 2, and the folder is left as
/// the first job has it.
#[test]
fn a_second_job_on_the_same_checkpoint_folder_is_refused() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    let shared = d.path().join("shared-checkpoints");
    let dir = format!("checkpoint.dir={}", shared.display());
    let mut first = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--listen",
            "127.0.0.1:0",
            "--run-dir",
            "runs/a",
            "--set",
            &dir,
        ],
        d.path(),
        "c1.out",
    );
    let addr = d.path().join("runs/a/coordinator.addr");
    eventually(Duration::from_secs(60), "the first coordinator", || {
        addr.exists().then_some(())
    });
    let before = crate::common::snapshot(&shared);
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--listen",
            "127.0.0.1:0",
            "--run-dir",
            "runs/b",
            "--set",
            &dir,
        ],
        d.path(),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "checkpoint folder {} is in use by another coordinator",
            shared.display()
        )),
        "{out}"
    );
    assert_eq!(
        crate::common::snapshot(&shared),
        before,
        "the folder changed"
    );
    assert!(
        first.child.try_wait().expect("wait").is_none(),
        "the first coordinator must be unharmed"
    );
}

#[test]
fn the_control_plane_holds_two_hundred_simulated_workers() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    // The load test binary asserts that every step ran and that the
    // coordinator's memory stayed bounded; figures in BENCHMARKS.md.
    let out = Command::new(crate::common::bin("loadtest"))
        .args(["--workers", "200", "--steps", "100"])
        .output()
        .expect("loadtest runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("200 simulated workers, 100 steps"), "{text}");
}

#[test]
fn a_step_past_the_step_timeout_names_the_ranks_that_did_not_report() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    // Heartbeats alone would take 30 s to notice the frozen worker; the
    // 2-second step timeout fires first and names it.
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&[
            "--local",
            "--set",
            "cluster.step_timeout_s=2",
            "--set",
            "cluster.heartbeat_timeout_s=30",
            "--set",
            "cluster.max_restarts=0",
        ]),
        d.path(),
        "c.out",
    );
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= 3).then_some(())
    });
    let victim = current_workers(d.path())[1];
    signal("-STOP", victim);
    let status = coord.wait(LIMIT);
    let _ = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("to report the step (not answered: ")
            && out.contains(&format!("pid {victim}), last heard")),
        "the timeout must name the silent rank: {out}"
    );
}

/// An evaluation far longer than `cluster.step_timeout_s` is not a dead
/// job as long as its ranks keep finishing micro-batches (their heartbeats
/// carry the count): the job completes without a restart.
#[test]
fn a_long_evaluation_that_progresses_is_not_taken_for_a_dead_rank() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    // 3 M validation tokens = 46,874 windows: ~1,500 micro-batches per
    // rank, against a 0.5 s step timeout.
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "data.synthetic_tokens=6000000",
            "--set",
            "data.val_fraction=0.5",
            "--set",
            "cluster.heartbeat_interval_s=0.1",
            "--set",
            "cluster.step_timeout_s=0.5",
            "--set",
            "cluster.max_restarts=0",
        ],
        d.path(),
        LIMIT,
    );
    assert!(status.success(), "{out}");
    let log = std::fs::read_to_string(d.path().join("runs/tiny/train.log")).unwrap_or_default();
    assert!(log.contains("validation: 46874 windows"), "{log}");
    assert!(log.contains("val loss"), "{log}");
    assert!(!log.contains("timed out"), "{log}");
}

/// A timeout in which every rank is alive and heartbeating says so, with
/// the key to raise; when it recurs at the same step after a restart, the
/// job stops instead of restarting into it again.
#[test]
fn work_slower_than_the_timeout_is_named_and_not_retried_forever() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    // One micro-batch of this model (12.6 M parameters, 2,048 tokens: ~155
    // GFLOP) takes far longer than 1 s on any CPU worker.
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            "model.n_embd=512",
            "--set",
            "model.n_layer=4",
            "--set",
            "model.context=128",
            "--set",
            "data.stride=128",
            "--set",
            "cluster.heartbeat_interval_s=0.1",
            "--set",
            "cluster.step_timeout_s=1",
            "--set",
            "cluster.max_restarts=5",
        ],
        d.path(),
        "c.out",
    );
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("every one of them is alive and heartbeating")
            && out.contains("raise cluster.step_timeout_s"),
        "the timeout must say the ranks are alive and which key to raise: {out}"
    );
    assert!(
        out.contains("restarting would run into it again"),
        "the second identical failure stops the job: {out}"
    );
    assert!(
        out.contains("restart 1/5") && !out.contains("restart 2/5"),
        "{out}"
    );
}

/// A panic on a worker's compute thread (injected in debug builds) is
/// reported to the coordinator at once with its message, naming the rank;
/// the worker exits with the failure code instead of heartbeating on.
#[test]
fn a_panic_on_the_compute_thread_is_reported_with_its_message() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn_env(
        "coordinator",
        &with(&["--local", "--set", "cluster.max_restarts=1"]),
        d.path(),
        "c.out",
        &[(Hook::PanicAtStep.var(), "3")],
    );
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("failed at step 3: the compute thread panicked: injected by STRIDE_TEST_PANIC_AT_STEP at step 3"),
        "the coordinator must name the rank and the panic: {out}"
    );
    let logs: String = (0..2)
        .map(|i| {
            std::fs::read_to_string(d.path().join(format!("runs/tiny/worker-{i}.log")))
                .unwrap_or_default()
        })
        .collect();
    assert!(
        logs.contains("this worker stops (exit 1)"),
        "the panicking worker exits: {logs}"
    );
}

/// tiny for 60 steps on three workers (48 samples: 16 each).
fn three_workers<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--config",
        "tiny",
        "--workers",
        "3",
        "--set",
        "train.global_batch=48",
        "--set",
        "train.max_steps=60",
        "--set",
        "train.warmup_steps=10",
        "--set",
        "checkpoint.interval=20",
        "--set",
        "train.eval_interval=25",
    ];
    v.extend_from_slice(extra);
    v
}

/// A collective error is a symptom, not a verdict. Three workers started
/// by hand, as in a cluster (no `--local`, so the coordinator learns of a
/// death only from the closed stream, racing the survivors' failed
/// all-reduce): one killed with SIGKILL mid-step is the one named and
/// replaced, with exactly one restart, and the survivors are kept; one
/// frozen with SIGSTOP is named by its missing heartbeats (the step
/// timeout is far away) and replaced; the job then ends with the weights
/// of an uninterrupted three-worker run.
#[test]
fn a_collective_error_blames_the_rank_that_failed_not_its_survivors() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = {
        let d = tempfile::tempdir().expect("tmp");
        let (status, out) = run(&three_workers(&["--local"]), d.path(), LIMIT);
        assert!(status.success(), "{out}");
        final_state(d.path())
    };
    let mut rng = seed();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &three_workers(&[
            "--listen",
            "127.0.0.1:0",
            "--set",
            "cluster.max_restarts=5",
            "--set",
            "cluster.step_timeout_s=600",
        ]),
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    let worker = |name: &str| {
        spawn(
            "worker",
            &[
                "--connect",
                &url,
                "--identity",
                name,
                "--connect-timeout",
                "60",
            ],
            d.path(),
            &format!("{name}.out"),
        )
    };
    let mut workers: Vec<Proc> = ["w-0", "w-1", "w-2"].iter().map(|n| worker(n)).collect();
    let restarts_logged = || round_restarts(d.path());

    // SIGKILL rank 1 while steps run (a step of tiny is mostly compute and
    // all-reduce, so this lands mid-step), then start its replacement.
    let at = 5 + next(&mut rng, 10) as usize;
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= at).then_some(())
    });
    let killed = workers[1].pid();
    signal("-9", killed);
    let _ = workers[1].wait(Duration::from_secs(30));
    workers.push(worker("w-1"));
    eventually(LIMIT, "the first restart", || {
        (restarts_logged() >= 1).then_some(())
    });

    // SIGSTOP rank 2 a few steps later; once it is named, kill it and
    // start its replacement.
    let at = steps_done(d.path()) + 3 + next(&mut rng, 5) as usize;
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= at).then_some(())
    });
    let frozen = workers[2].pid();
    signal("-STOP", frozen);
    eventually(LIMIT, "the second restart", || {
        (restarts_logged() >= 2).then_some(())
    });
    signal("-9", frozen);
    workers.push(worker("w-2"));

    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    assert!(
        out.contains("restart 2/5") && !out.contains("restart 3/5"),
        "two failures, exactly two restarts: {out}"
    );
    let named = |pid: u32| {
        out.lines()
            .filter(|l| l.contains(" lost at step ") || l.contains(" failed at step "))
            .filter(|l| l.contains(&format!("pid {pid})")) && !l.contains("a symptom"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let killed_lines = named(killed);
    assert!(
        killed_lines.iter().any(|l| l.contains("rank 1 ")),
        "the killed rank must be named with its pid: {out}"
    );
    let frozen_lines = named(frozen);
    assert!(
        !frozen_lines.is_empty() && frozen_lines.iter().all(|l| l.contains("no heartbeat for")),
        "the frozen rank must be named by its heartbeats, and only then: {out}"
    );
    // Nobody else was blamed (without the symptom rule, a survivor whose
    // all-reduce failed first would be named and removed here).
    let survivor = workers[0].pid();
    assert!(named(survivor).is_empty(), "a survivor was blamed: {out}");
    // The survivor of both failures stayed in the job and ends cleanly.
    let s = workers[0].wait(Duration::from_secs(60));
    assert!(s.success(), "the survivor w-0 must finish the job");
    assert_eq!(
        final_state(d.path()),
        want,
        "after a kill and a freeze the weights differ from the uninterrupted run"
    );
}

/// A rank whose all-reduce fails while every rank lives (injected in debug
/// builds: rank 0 reports a failed exchange with rank 1 at step 7) loses
/// nobody: the coordinator waits a heartbeat timeout for a dead or frozen
/// rank, finds none, aborts the step and restarts once with the same
/// workers, and the job ends with the weights of an uninterrupted run.
#[test]
fn a_collective_error_with_every_rank_alive_removes_nobody() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = reference();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn_env(
        "coordinator",
        &with(&["--local", "--set", "cluster.max_restarts=2"]),
        d.path(),
        "c.out",
        &[(Hook::CollectiveErrorAtStep.var(), "7")],
    );
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    assert!(
        out.contains("(a symptom: looking for the rank that failed, starting with rank 1)"),
        "{out}"
    );
    assert!(
        out.contains("no rank was found dead or frozen") && out.contains("every rank is kept"),
        "{out}"
    );
    assert!(
        out.contains("restart 1/2") && !out.contains("restart 2/2"),
        "{out}"
    );
    assert!(
        !out.contains("lost at step"),
        "nobody may be removed: {out}"
    );
    // The same two worker processes ran the whole job.
    let log = std::fs::read_to_string(d.path().join("runs/tiny/train.log")).unwrap_or_default();
    assert_eq!(worker_pids(&log).len(), 2, "no worker was replaced: {log}");
    assert_eq!(final_state(d.path()), want);
}

/// A new worker with the identity of a rank still in the job (Kubernetes
/// started a new pod for that index) means the old process is gone: the
/// coordinator replaces that rank at once, long before its heartbeat
/// timeout, and the job ends as if nothing had happened.
#[test]
fn a_new_worker_with_a_ranks_identity_replaces_that_rank() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = reference();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&[
            "--listen",
            "127.0.0.1:0",
            "--set",
            "cluster.heartbeat_timeout_s=300",
            "--set",
            "cluster.step_timeout_s=600",
        ]),
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    let worker = |name: &str, log: &str| {
        spawn(
            "worker",
            &["--connect", &url, "--identity", name],
            d.path(),
            log,
        )
    };
    let _w0 = worker("w-0", "w0.out");
    let old = worker("w-1", "w1.out");
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= 8).then_some(())
    });
    signal("-STOP", old.pid());
    let _new = worker("w-1", "w1b.out");
    let status = coord.wait(LIMIT);
    signal("-9", old.pid());
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("pid {}) lost at step", old.pid()))
            && out.contains("a new worker with its identity joined"),
        "the frozen rank must be replaced by its identity's new worker: {out}"
    );
    assert!(!out.contains("no heartbeat for"), "{out}");
    assert_eq!(final_state(d.path()), want);
}

/// When the worker set cannot re-form after a failure, the job fails and
/// tells the workers that are still there so (exit 4: nothing to rejoin,
/// Kubernetes must not retry) instead of dropping their sessions, which
/// would send them reconnecting to a coordinator that is gone.
#[test]
fn workers_left_waiting_when_the_job_fails_are_told_to_stop() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&[
            "--listen",
            "127.0.0.1:0",
            "--set",
            "cluster.min_workers=2",
            "--set",
            "cluster.startup_timeout_s=3",
        ]),
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    let worker = |name: &str| {
        spawn(
            "worker",
            &["--connect", &url, "--identity", name],
            d.path(),
            &format!("{name}.out"),
        )
    };
    let mut w0 = worker("w-0");
    let w1 = worker("w-1");
    eventually(LIMIT, "training progress", || {
        (steps_done(d.path()) >= 5).then_some(())
    });
    signal("-9", w1.pid());
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("only 1 of 2 workers joined"), "{out}");
    let code = w0.wait(Duration::from_secs(30)).code();
    let wout = std::fs::read_to_string(d.path().join("w-0.out")).unwrap_or_default();
    assert_eq!(code, Some(4), "{wout}");
    assert!(!wout.contains("reconnecting"), "{wout}");
}

/// A first SIGTERM (preemption, a node drain) lets the step in flight
/// finish, commits a checkpoint of it, stops the workers and exits 143;
/// resuming that checkpoint ends with the weights and optimizer state of
/// an uninterrupted run, bit for bit.
#[test]
fn sigterm_checkpoints_the_step_in_flight_and_the_resume_is_exact() {
    // Heartbeat and step timeouts would measure a neighbour's load.
    let _turn = crate::common::alone();
    let want = reference();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn("coordinator", &with(&["--local"]), d.path(), "c1.out");
    // Between the interval checkpoints (20, 40) and off the evaluation (25).
    eventually(LIMIT, "step 31", || {
        (steps_done(d.path()) >= 31).then_some(())
    });
    signal("-TERM", coord.pid());
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(d.path().join("c1.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(143), "{out}");
    let m = metrics(&d.path().join("runs/tiny"));
    let event = m
        .iter()
        .find(|r| r["event"] == "preempted")
        .unwrap_or_else(|| panic!("no preempted event: {out}"));
    let step = event["step"].as_u64().expect("step");
    let last_trained = m
        .iter()
        .filter_map(|r| r["loss"].as_f64().and(r["step"].as_u64()))
        .max();
    assert_eq!(
        last_trained,
        Some(step - 1),
        "the checkpoint is of the last finished step"
    );
    assert!(step > 31 && step < 60, "{out}");
    let dir = d
        .path()
        .join(format!("runs/tiny/checkpoints/step-{step:08}"));
    checkpoint::validate(&dir).expect("a committed checkpoint of the step in flight");
    assert!(
        out.contains(&format!(
            "stopped after SIGTERM with a checkpoint of step {step}"
        )),
        "{out}"
    );
    let log = std::fs::read_to_string(d.path().join("runs/tiny/train.log")).unwrap_or_default();
    for pid in worker_pids(&log) {
        eventually(Duration::from_secs(30), "the workers to stop", || {
            (!crate::common::alive(pid)).then_some(())
        });
    }

    let (status, out) = run(
        &["--resume", "runs/tiny/checkpoints/latest", "--local"],
        d.path(),
        LIMIT,
    );
    assert!(status.success(), "{out}");
    assert!(out.contains(&format!("at step {step}")), "{out}");
    assert_eq!(
        final_state(d.path()),
        want,
        "the resumed run ended with other weights than the uninterrupted one"
    );
}
