//! The failure cases a chaos run found (killing, freezing, corrupting and
//! filling disks at every phase of a `tiny` job), each with the message
//! and the exit code of every process: a worker lost and not replaced, a
//! local worker that dies without a rank, a token file truncated under the
//! job, a full disk (the workers' and the coordinator's), a finished job
//! restarted, a SIGTERM while the worker set forms, a torn metrics line.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{Proc, alone, eventually, metrics, run, spawn, spawn_env, worker_pids};
use crate::failures::{
    LIMIT, current_workers, final_state, free_port, reference, round_restarts, signal, steps_done,
    with,
};
use stride_job::checkpoint;
use stride_job::test_hooks::Hook;

/// `tiny` on two workers for `steps` steps, a checkpoint every 20.
fn tiny<'a>(steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--config",
        "tiny",
        "--workers",
        "2",
        "--set",
        steps,
        "--set",
        "train.warmup_steps=10",
        "--set",
        "checkpoint.interval=20",
        "--set",
        "train.eval_interval=0",
    ];
    v.extend_from_slice(extra);
    v
}

fn log_of(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// The lines of `out` that name a rank lost or failed, with `pid`.
fn blamed(out: &str, pid: u32) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains(" lost at step ") || l.contains(" failed at step "))
        .filter(|l| l.contains(&format!("pid {pid})")) && !l.contains("a symptom"))
        .collect()
}

/// Hand-started workers (a cluster), `min_workers` 1: one killed and not
/// replaced leaves the job on the survivor — who is never blamed — after
/// `cluster.rejoin_timeout_s`; a replacement that joins later is taken
/// back at the next step boundary (a checkpoint of it, then a new
/// formation), and the job ends with exit 0 everywhere.
#[test]
fn a_lost_worker_not_replaced_leaves_the_job_on_the_survivor_until_one_joins() {
    let _turn = alone();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &tiny(
            "train.max_steps=400",
            &[
                "--listen",
                "127.0.0.1:0",
                "--set",
                "cluster.min_workers=1",
                "--set",
                "cluster.rejoin_timeout_s=2",
            ],
        ),
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    let worker = |name: &str, log: &str| {
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
            log,
        )
    };
    let mut w0 = worker("w-0", "w0.out");
    let mut w1 = worker("w-1", "w1.out");
    eventually(LIMIT, "step 25", || {
        (steps_done(d.path()) >= 25).then_some(())
    });
    let killed = w1.pid();
    signal("-9", killed);
    let _ = w1.wait(Duration::from_secs(30));
    eventually(LIMIT, "the job to go on with one worker", || {
        let log = log_of(d.path(), "runs/tiny/train.log");
        log.contains("continuing with 1 of 2 workers").then_some(())
    });
    let on_one = steps_done(d.path());
    eventually(LIMIT, "steps on one worker", || {
        (steps_done(d.path()) >= on_one + 3).then_some(())
    });
    let mut w1b = worker("w-1", "w1b.out");
    let status = coord.wait(LIMIT);
    let out = log_of(d.path(), "c.out");
    assert!(status.success(), "{out}");
    assert!(
        !blamed(&out, killed).is_empty(),
        "the killed rank must be named: {out}"
    );
    assert!(
        blamed(&out, w0.pid()).is_empty(),
        "the healthy rank was blamed: {out}"
    );
    for needle in [
        "continuing with 1 of 2 workers",
        "joined as a spare; the job runs short",
        "a replacement joined: re-forming",
    ] {
        assert!(out.contains(needle), "lacks `{needle}`: {out}");
    }
    // Steps ran on one worker, then on two again, to the end.
    let m = metrics(&d.path().join("runs/tiny"));
    let workers_at: Vec<u64> = m.iter().filter_map(|r| r["workers"].as_u64()).collect();
    let first_single = workers_at
        .iter()
        .position(|&w| w == 1)
        .expect("steps on one worker");
    assert!(
        workers_at[first_single..].contains(&2),
        "the replacement must be taken back: {workers_at:?}"
    );
    assert!(m.iter().any(|r| r["event"] == "grow"), "no grow event");
    checkpoint::validate(&d.path().join("runs/tiny/checkpoints/step-00000400"))
        .expect("the run's last checkpoint");
    for (name, w) in [("w-0", &mut w0), ("the replacement", &mut w1b)] {
        let code = w.wait(Duration::from_secs(60)).code();
        assert_eq!(code, Some(0), "{name} must finish with the job");
    }
}

/// With `--local`, every worker process that dies is started again: two
/// killed at once (the second dies while idle between generations) and a
/// fresh one killed before it can register. The job ends with the weights
/// of an uninterrupted run.
#[test]
fn local_workers_that_die_without_a_rank_are_restarted_too() {
    let _turn = alone();
    let want = reference();
    let d = tempfile::tempdir().expect("tmp");
    let mut coord = spawn(
        "coordinator",
        &with(&["--local", "--set", "cluster.max_restarts=5"]),
        d.path(),
        "c.out",
    );
    eventually(LIMIT, "step 25", || {
        (steps_done(d.path()) >= 25).then_some(())
    });
    let both = current_workers(d.path());
    assert_eq!(both.len(), 2);
    let killed = std::process::Command::new("kill")
        .args(["-9", &both[0].to_string(), &both[1].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The first restart's new process, killed at once.
    let restarted = eventually(LIMIT, "a restarted worker", || {
        let log = log_of(d.path(), "runs/tiny/train.log");
        log.lines()
            .find(|l| l.contains("restarted local worker") || l.contains("restarted it (pid "))
            .and_then(|l| l.rsplit("pid ").next())
            .and_then(|p| p.trim_end_matches(')').parse::<u32>().ok())
    });
    signal("-9", restarted);
    let status = coord.wait(LIMIT);
    let out = log_of(d.path(), "c.out");
    assert!(status.success(), "{out}");
    assert!(
        out.contains("without holding a rank") && out.contains("restarted it (pid "),
        "a worker that died without a rank must be restarted: {out}"
    );
    assert!(out.contains("lost at step"), "{out}");
    assert_eq!(final_state(d.path()), want, "the weights differ");
}

/// A token file truncated while the job reads it is named by the ranks at
/// their next step (before: SIGBUS, a timeout and the healthy rank 0
/// blamed); the job stops with exit 1 and its workers with 4.
#[test]
fn a_token_file_truncated_under_a_running_job_is_named_at_once() {
    let _turn = alone();
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(d.path().join("data")).expect("mkdir");
    let train = d.path().join("data/train.bin");
    let tokens: Vec<u16> = (0..200_000u32).map(|i| (i * 7 % 128) as u16).collect();
    stride_job::tokens::write_nanogpt(&train, &tokens).expect("write");
    let mut coord = spawn(
        "coordinator",
        &tiny(
            "train.max_steps=100000",
            &["--local", "--set", "data.train=data/train.bin"],
        ),
        d.path(),
        "c.out",
    );
    eventually(LIMIT, "step 5", || {
        (steps_done(d.path()) >= 5).then_some(())
    });
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&train)
        .expect("open");
    f.set_len(100_000).expect("truncate");
    let status = coord.wait(LIMIT);
    let out = log_of(d.path(), "c.out");
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("data/train.bin") && out.contains("changed while the job read it"),
        "{out}"
    );
    assert!(!out.contains("timed out"), "{out}");
    for i in 0..2 {
        let log = log_of(d.path(), &format!("runs/tiny/worker-{i}.log"));
        assert!(
            !log.contains("SIGBUS") && !log.contains("signal: 7"),
            "{log}"
        );
    }
}

/// A checkpoint that meets a full disk — rank 0's files (a test
/// hook makes the model file a link to /dev/full: the kernel's own
/// ENOSPC), or the coordinator's own config.toml — stops the job at once
/// (exit 1, not the bad-input 2), naming ENOSPC, the folder and the bytes;
/// the temporary folder is removed and the checkpoint before stays the
/// newest, from which the job resumes.
#[test]
fn a_full_disk_stops_the_job_at_once_and_keeps_the_last_checkpoint() {
    let _turn = alone();
    for (hook, needles) in [
        (
            Hook::FullDiskAtStep.var(),
            &["no space left on device (ENOSPC)", "MB) are free", "need"][..],
        ),
        (
            Hook::CoordinatorFullDiskAtStep.var(),
            &[
                "no space left on device (ENOSPC)",
                "bytes free",
                "config.toml",
            ][..],
        ),
    ] {
        let d = tempfile::tempdir().expect("tmp");
        let started = Instant::now();
        let mut coord = spawn_env(
            "coordinator",
            &tiny("train.max_steps=60", &["--local"]),
            d.path(),
            "c.out",
            &[(hook, "40")],
        );
        let status = coord.wait(LIMIT);
        println!(
            "{hook}: the job exited {:.1} s after it started",
            started.elapsed().as_secs_f64()
        );
        let out = log_of(d.path(), "c.out");
        assert_eq!(status.code(), Some(1), "{hook}: {out}");
        for n in needles.iter().chain(&[
            "the checkpoint of step 40 was not written",
            "the newest checkpoint is still",
            "step-00000020",
        ]) {
            assert!(out.contains(n), "{hook}: lacks `{n}`: {out}");
        }
        assert!(!out.contains("finishing 1 checkpoint"), "{hook}: {out}");
        let folder = d.path().join("runs/tiny/checkpoints");
        let names: Vec<String> = std::fs::read_dir(&folder)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".tmp-")),
            "{hook}: a temporary folder was left: {names:?}"
        );
        assert_eq!(
            checkpoint::pointer_step(&folder, checkpoint::LATEST),
            Some(20),
            "{hook}"
        );
        // Local workers were told the coordinator stopped (3: may rejoin).
        for i in 0..2 {
            let log = log_of(d.path(), &format!("runs/tiny/worker-{i}.log"));
            assert!(log.contains("the coordinator stopped"), "{hook}: {log}");
        }
        let (status, out) = run(
            &["--resume", "runs/tiny/checkpoints/latest", "--local"],
            d.path(),
            LIMIT,
        );
        assert!(status.success(), "{hook}: the resume failed: {out}");
        assert!(out.contains("at step 20"), "{hook}: {out}");
    }
}

/// A coordinator restarted after its job's final commit (`--resume
/// …/latest` of a finished run) exits 0 with "nothing left to train", and
/// tells a worker that reconnects to it that the job is finished (exit 0)
/// instead of leaving it to fail after `--connect-timeout`.
#[test]
fn a_finished_job_exits_0_and_tells_its_reconnecting_workers() {
    let _turn = alone();
    let d = tempfile::tempdir().expect("tmp");
    let (status, out) = run(&tiny("train.max_steps=20", &["--local"]), d.path(), LIMIT);
    assert!(status.success(), "{out}");
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let mut coord = spawn(
        "coordinator",
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--listen",
            &listen,
        ],
        d.path(),
        "again.out",
    );
    let mut w = spawn(
        "worker",
        &["--connect", &url, "--connect-timeout", "60"],
        d.path(),
        "w.out",
    );
    let code = w.wait(LIMIT).code();
    let wout = log_of(d.path(), "w.out");
    assert_eq!(code, Some(0), "{wout}");
    assert!(wout.contains("the job is finished"), "{wout}");
    let status = coord.wait(LIMIT);
    let out = log_of(d.path(), "again.out");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("nothing left to train"), "{out}");
}

/// A first SIGTERM while the worker set forms (no step in flight) stops
/// the job with 143, the preemption code, naming the checkpoint to resume
/// — or saying that nothing had run — instead of 130.
#[test]
fn a_sigterm_while_the_workers_form_exits_143() {
    let _turn = alone();
    let d = tempfile::tempdir().expect("tmp");
    let (status, out) = run(&tiny("train.max_steps=20", &["--local"]), d.path(), LIMIT);
    assert!(status.success(), "{out}");
    for (args, needle) in [
        (
            vec![
                "--config",
                "tiny",
                "--listen",
                "127.0.0.1:0",
                "--run-dir",
                "runs/fresh",
                "--set",
                "checkpoint.dir=fresh",
            ],
            "before step 0 (no step had run, nothing to save)",
        ),
        (
            vec![
                "--resume",
                "runs/tiny/checkpoints/latest",
                "--extend-steps",
                "40",
                "--listen",
                "127.0.0.1:0",
            ],
            "with a checkpoint of step 20",
        ),
    ] {
        let run_dir = if args.contains(&"runs/fresh") {
            "fresh"
        } else {
            "tiny"
        };
        let addr = d.path().join("runs").join(run_dir).join("coordinator.addr");
        let _ = std::fs::remove_file(&addr);
        let mut coord = spawn("coordinator", &args, d.path(), "c.out");
        eventually(Duration::from_secs(60), "the coordinator to listen", || {
            addr.exists().then_some(())
        });
        signal("-TERM", coord.pid());
        let status = coord.wait(LIMIT);
        let out = log_of(d.path(), "c.out");
        assert_eq!(status.code(), Some(143), "{args:?}: {out}");
        assert!(out.contains(needle), "{args:?}: {out}");
    }
}

/// A `metrics.jsonl` whose last line was torn by a crash or a full disk is
/// cut back to its last whole line when the run resumes, so the resume
/// marker is not glued to it and `report` still reads the file.
#[test]
fn a_torn_metrics_line_is_cut_before_a_resume_appends() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let (status, out) = run(&tiny("train.max_steps=20", &["--local"]), d.path(), LIMIT);
    assert!(status.success(), "{out}");
    let file = d.path().join("runs/tiny/metrics.jsonl");
    let mut text = std::fs::read_to_string(&file).expect("read");
    text.push_str("{\"step\": 20, \"loss\": 1.2");
    std::fs::write(&file, text).expect("write");
    let (status, out) = run(
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--extend-steps",
            "30",
            "--local",
        ],
        d.path(),
        LIMIT,
    );
    assert!(status.success(), "{out}");
    assert!(out.contains("removed a torn last line"), "{out}");
    // Every line parses (metrics() panics otherwise), the marker included.
    let m = metrics(&d.path().join("runs/tiny"));
    assert!(m.iter().any(|r| r["event"] == "resume"));
    let report = std::process::Command::new(crate::common::bin("coordinator"))
        .args(["report", "runs/tiny", "--json"])
        .current_dir(d.path())
        .output()
        .expect("report");
    assert!(report.status.success(), "{report:?}");
}

/// Spares that join with other data, and the restarts that would have
/// followed: a worker reading other data is refused when it joins, alone
/// (exit 2), and the job goes on with the others; two workers' pids are
/// reported when lost.
#[test]
fn a_worker_with_other_data_is_refused_alone_when_it_joins() {
    let _turn = alone();
    let job = tempfile::tempdir().expect("tmp");
    let other = tempfile::tempdir().expect("tmp");
    for (dir, mul) in [(job.path(), 7u32), (other.path(), 11)] {
        std::fs::create_dir_all(dir.join("data")).expect("mkdir");
        let tokens: Vec<u16> = (0..40_000u32).map(|i| (i * mul % 128) as u16).collect();
        stride_job::tokens::write_nanogpt(&dir.join("data/train.bin"), &tokens).expect("w");
    }
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--set",
            "cluster.max_workers=2",
            "--set",
            "train.max_steps=300",
            "--set",
            "data.train=data/train.bin",
            "--set",
            "train.global_batch=16",
        ],
        job.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(job.path(), "tiny", &mut coord);
    // First the worker with other data: refused, alone; the job waits on.
    let mut refused: Proc = spawn("worker", &["--connect", &url], other.path(), "w.out");
    let code = refused.wait(LIMIT).code();
    let wout = log_of(other.path(), "w.out");
    assert_eq!(code, Some(2), "{wout}");
    assert!(
        wout.contains("refused by the coordinator") && wout.contains("train data differs"),
        "{wout}"
    );
    let mut good = spawn("worker", &["--connect", &url], job.path(), "good.out");
    eventually(LIMIT, "training progress", || {
        (steps_done(job.path()) >= 3).then_some(())
    });
    // Then the same as a spare while it trains.
    let mut spare = spawn("worker", &["--connect", &url], other.path(), "spare.out");
    assert_eq!(spare.wait(LIMIT).code(), Some(2));
    let status = coord.wait(LIMIT);
    let out = log_of(job.path(), "c.out");
    assert!(status.success(), "{out}");
    assert_eq!(out.matches("refused worker").count(), 2, "{out}");
    assert!(
        out.contains("the worker's data/train.bin") && out.contains("xxh3"),
        "{out}"
    );
    assert_eq!(good.wait(LIMIT).code(), Some(0));
    let log = log_of(job.path(), "runs/tiny/train.log");
    assert_eq!(worker_pids(&log).len(), 1, "only the good worker joined");
    assert_eq!(round_restarts(job.path()), 0, "no restart: {log}");
}
