//! End-to-end: real coordinator and worker processes on 127.0.0.1.

use std::time::Duration;

use crate::common::{alive, eventually, metrics, run, spawn, worker_pids};
use stride_job::config::RawConfig;
use stride_job::synthetic::MarkovSource;

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_main_job_trains_tiny_to_its_entropy_floor() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let (status, out) = run(
        &["--config", "tiny", "--workers", "2", "--local"],
        dir.path(),
        LIMIT,
    );
    assert!(status.success(), "{out}");

    let config = RawConfig::locate("tiny")
        .and_then(|r| r.resolve())
        .expect("tiny");
    let floor = MarkovSource::new(
        config.model.vocab_size,
        config.data.synthetic_branching,
        config.train.seed,
    )
    .entropy_rate();
    let m = metrics(&dir.path().join("runs/tiny"));
    assert_eq!(
        m.len() as u64,
        config.train.max_steps,
        "one metrics line per step"
    );
    for (i, rec) in m.iter().enumerate() {
        assert_eq!(rec["step"], i as u64);
        for key in ["loss", "lr", "grad_norm", "tokens_per_s", "epoch"] {
            assert!(!rec[key].is_null(), "step {i} lacks {key}");
        }
    }
    let first = m[0]["loss"].as_f64().expect("loss");
    let vocab = config.model.vocab_size as f64;
    assert!(
        (first - vocab.ln()).abs() < 0.3,
        "starts near ln(vocab): {first}"
    );
    let val = m
        .last()
        .and_then(|r| r["val_loss"].as_f64())
        .expect("final val_loss");
    assert!(
        val - floor < 0.15,
        "val loss {val} is not within 0.15 nats of the entropy floor {floor}"
    );
    assert!(
        val > floor - 0.05,
        "val loss {val} below the floor {floor}: the floor or the loss is wrong"
    );
    let evaluated = m.iter().filter(|r| !r["val_loss"].is_null()).count() as u64;
    assert_eq!(
        evaluated,
        config.train.max_steps / config.train.eval_interval
    );

    let log = std::fs::read_to_string(dir.path().join("runs/tiny/train.log")).expect("train.log");
    assert!(
        log.contains("done: ") && log.contains("tokens/s"),
        "summary missing: {log}"
    );
    let pids = worker_pids(&log);
    assert_eq!(pids.len(), 2, "{log}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "local workers outlived the coordinator"
    );
}

/// Per-step losses of a short run with `workers` workers.
fn losses(workers: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = workers.to_string();
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--workers",
            &w,
            "--local",
            "--set",
            "train.max_steps=20",
            "--set",
            "train.warmup_steps=5",
            "--set",
            "train.global_batch=16",
            "--set",
            "train.micro_batch=4",
            "--set",
            "train.eval_interval=0",
            "--set",
            "train.eval_batches=1",
        ],
        dir.path(),
        LIMIT,
    );
    assert!(status.success(), "{workers} workers: {out}");
    let m = metrics(&dir.path().join("runs/tiny"));
    assert_eq!(m.len(), 20);
    assert!(m.iter().all(|r| r["workers"] == workers as u64));
    m.iter()
        .map(|r| r["loss"].as_f64().expect("loss"))
        .collect()
}

#[test]
fn one_two_and_four_workers_train_the_same_model() {
    let _turn = crate::common::beside_others();
    // Same global batch (16): 1 × micro 4 × accumulation 4, 2 × 4 × 2,
    // 4 × 4 × 1. The coordinator itself fails a run whose ranks disagree on
    // the weights after any step, so success also means bit-identical ranks.
    let one = losses(1);
    for workers in [2, 4] {
        let other = losses(workers);
        for (step, (a, b)) in one.iter().zip(&other).enumerate() {
            assert!(
                ((a - b) / a).abs() < 1e-4,
                "step {step}: 1 worker loss {a}, {workers} workers loss {b}"
            );
        }
    }
}

#[test]
fn workers_started_separately_join_by_url() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--set",
            "train.max_steps=5",
            "--set",
            "train.warmup_steps=0",
        ],
        dir.path(),
        "coordinator.out",
    );
    let url = crate::common::coordinator_url(dir.path(), "tiny", &mut coord);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut w0 = spawn("worker", &["--connect", &url], dir.path(), "w0.out");
    let mut w1 = spawn("worker", &["--connect", &url], dir.path(), "w1.out");
    let status = coord.wait(LIMIT);
    let out = std::fs::read_to_string(dir.path().join("coordinator.out")).unwrap_or_default();
    assert!(status.success(), "{out}");
    assert!(w0.wait(Duration::from_secs(30)).success());
    assert!(w1.wait(Duration::from_secs(30)).success());
    assert_eq!(metrics(&dir.path().join("runs/tiny")).len(), 5);
}

#[test]
fn ctrl_c_stops_the_coordinator_and_its_local_workers() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            "train.max_steps=100000",
        ],
        dir.path(),
        "coordinator.out",
    );
    let run_dir = dir.path().join("runs/tiny");
    eventually(Duration::from_secs(120), "three steps", || {
        (metrics(&run_dir).len() >= 3).then_some(())
    });
    let status = std::process::Command::new("kill")
        .args(["-INT", &coord.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let status = coord.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "Ctrl-C exits with 130");
    let log = std::fs::read_to_string(run_dir.join("train.log")).expect("train.log");
    assert!(log.contains("interrupted by Ctrl-C"), "{log}");
    let pids = worker_pids(&log);
    assert_eq!(pids.len(), 2);
    for p in pids {
        assert!(!alive(p), "worker {p} outlived Ctrl-C");
    }
}

#[test]
fn a_missing_data_file_fails_before_any_worker_starts() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--local",
            "--set",
            "data.train=nothere.bin",
        ],
        dir.path(),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("nothere.bin") && out.contains("cannot open"),
        "{out}"
    );
    assert!(
        !dir.path().join("runs/tiny/worker-0.log").exists(),
        "no worker may start"
    );
}

#[test]
fn a_worker_with_the_wrong_token_is_refused_and_named() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
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
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=0",
        ],
        dir.path(),
        "coordinator.out",
    );
    let url = crate::common::coordinator_url(dir.path(), "tiny", &mut coord);
    let intruder = std::process::Command::new(crate::common::bin("worker"))
        .args(["--connect", &url])
        .env("STRIDE_TOKEN", "not-the-token")
        .output()
        .expect("worker runs");
    assert!(!intruder.status.success());
    let err = String::from_utf8_lossy(&intruder.stderr);
    assert!(err.contains("missing or wrong job token"), "{err}");
    let mut ok = spawn("worker", &["--connect", &url], dir.path(), "w.out");
    assert!(coord.wait(LIMIT).success());
    assert!(ok.wait(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(dir.path().join("runs/tiny/train.log")).expect("log");
    assert!(log.contains("refused an RPC from 127.0.0.1:"), "{log}");
    assert!(
        log.contains("1 workers: global batch"),
        "the refused worker must not have joined: {log}"
    );
}

#[test]
fn without_a_token_a_cluster_coordinator_refuses_to_start() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(crate::common::bin("coordinator"))
        .args(["--config", "tiny", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("STRIDE_TOKEN")
        .output()
        .expect("coordinator runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no job token"), "{err}");
}

#[test]
fn asking_a_cpu_build_for_cuda_is_one_clear_error() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--local",
            "--set",
            "worker.device=cuda",
        ],
        dir.path(),
        Duration::from_secs(120),
    );
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("rank 0 (")
            && out.contains("built without CUDA support")
            && out.contains("--features cuda"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

/// The CUDA image starts the CPU worker with `STRIDE_CUDA_WORKER` naming
/// the CUDA build: a missing shared library is one clear error naming it
/// (never the loader's message), and otherwise the worker becomes that
/// binary with the same arguments. The "CUDA build" here is a small program
/// linked against a library that is then deleted, as libcuda is absent on
/// a CPU node.
#[test]
fn the_cuda_handoff_names_a_missing_library_or_becomes_the_cuda_worker() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("lib.c"),
        "int stride_fake_cuda(void) { return 0; }\n",
    )
    .expect("w");
    std::fs::write(
        d.join("main.c"),
        "int stride_fake_cuda(void);\nint main(void) { return stride_fake_cuda(); }\n",
    )
    .expect("w");
    let gcc = |args: &[&str]| {
        let out = std::process::Command::new("gcc")
            .args(args)
            .current_dir(d)
            .output()
            .expect("gcc (the machine's C compiler) runs");
        assert!(
            out.status.success(),
            "gcc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gcc(&[
        "-shared",
        "-fPIC",
        "-o",
        "libstride_fake_cuda.so.1",
        "lib.c",
    ]);
    gcc(&[
        "-o",
        "worker-cuda",
        "main.c",
        "-L.",
        "-l:libstride_fake_cuda.so.1",
    ]);
    std::fs::remove_file(d.join("libstride_fake_cuda.so.1")).expect("rm");

    let worker = |cuda: &std::path::Path| {
        std::process::Command::new(crate::common::bin("worker"))
            .args(["--connect", "http://127.0.0.1:9", "--dry-run"])
            .env("STRIDE_CUDA_WORKER", cuda)
            .env("STRIDE_TOKEN", crate::common::TOKEN)
            .output()
            .expect("worker runs")
    };
    let out = worker(&d.join("worker-cuda"));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("libstride_fake_cuda.so.1") && text.contains("cannot start on this machine"),
        "{text}"
    );
    assert!(
        !text.contains("error while loading shared libraries"),
        "{text}"
    );

    // All libraries present: the process becomes the named binary, which
    // receives the worker's arguments.
    std::fs::write(d.join("echo-args"), "#!/bin/sh\necho \"handed over: $*\"\n").expect("w");
    let chmod = std::process::Command::new("chmod")
        .args(["+x", "echo-args"])
        .current_dir(d)
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let out = worker(&d.join("echo-args"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "handed over: --connect http://127.0.0.1:9 --dry-run"
    );

    let out = worker(&d.join("absent"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

#[test]
fn status_shows_the_live_job_to_token_holders_only() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            "train.max_steps=100000",
            "--set",
            "checkpoint.interval=5",
        ],
        dir.path(),
        "coordinator.out",
    );
    let url = crate::common::coordinator_url(dir.path(), "tiny", &mut coord);
    let run_dir = dir.path().join("runs/tiny");
    eventually(Duration::from_secs(120), "six steps", || {
        (metrics(&run_dir).len() >= 6).then_some(())
    });
    let status = |token: &str| {
        std::process::Command::new(crate::common::bin("coordinator"))
            .args(["status", "--connect", &url])
            .env("STRIDE_TOKEN", token)
            .output()
            .expect("status runs")
    };
    // The step-5 checkpoint is written in the background and committed a
    // little after its step: ask until the status names it.
    let text = eventually(Duration::from_secs(60), "a committed checkpoint", || {
        let out = status(crate::common::TOKEN);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("step-00000005").then_some(text)
    });
    for want in [
        "job `tiny`: step ",
        "/100000",
        "ETA",
        "lr ",
        "workers 2/2, restarts 0",
        "step-00000005",
        "rank 0",
        "rank 1",
    ] {
        assert!(text.contains(want), "status lacks `{want}`:\n{text}");
    }
    let out = status("wrong");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing or wrong job token"));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &coord.pid().to_string()])
        .status();
    assert_eq!(coord.wait(Duration::from_secs(60)).code(), Some(130));
}

/// `coordinator decay` on a live job: the cooldown starts at the next step
/// boundary S and the run ends at S + K, the schedule gaining the segment a
/// resume-and-extend would append; it is recorded (metrics event, status),
/// a checkpoint written inside the cooldown resumes with it exactly, and
/// every impossible request is refused with exit 2 and changes nothing.
#[test]
fn decay_on_demand_cools_a_live_job_down_and_its_checkpoints_keep_the_new_schedule() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            "train.max_steps=400",
            "--set",
            "checkpoint.interval=5",
            "--set",
            "checkpoint.keep_last=100",
        ],
        dir.path(),
        "coordinator.out",
    );
    let url = crate::common::coordinator_url(dir.path(), "tiny", &mut coord);
    let run_dir = dir.path().join("runs/tiny");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::bin("coordinator"))
            .args(args)
            .args(["--connect", &url])
            .current_dir(dir.path())
            .env("STRIDE_TOKEN", crate::common::TOKEN)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Past warmup (40 steps): the LR in force is the peak.
    eventually(LIMIT, "45 steps", || {
        (metrics(&run_dir).len() >= 45).then_some(())
    });
    let (code, _, err) = cli(&["decay", "--over", "1000"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("decay only shortens a run"), "{err}");
    let (code, out, err) = cli(&["decay", "--over", "20", "--shape", "linear"]);
    assert_eq!(code, Some(0), "{err}");
    let s: u64 = out
        .split("from step ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        out.contains(&format!("the run now ends at step {}", s + 20)),
        "{out}"
    );
    let (code, _, err) = cli(&["decay", "--over", "5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("already cooling down"), "{err}");
    let (code, status, err) = cli(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(status.contains(&format!("/{}", s + 20)), "{status}");
    assert!(
        status.contains(&format!("linear from step {s} to {}", s + 20))
            && status.contains(&format!("decay requested at step {s}")),
        "{status}"
    );
    let out = std::process::Command::new(crate::common::bin("coordinator"))
        .args(["decay", "--over", "5", "--connect", &url])
        .env("STRIDE_TOKEN", "wrong")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing or wrong job token"));

    assert!(coord.wait(LIMIT).success());
    let m = metrics(&run_dir);
    let event = m
        .iter()
        .find(|r| r["event"] == "decay")
        .expect("a decay event");
    assert_eq!(event["step"], s);
    assert_eq!(event["max_steps"], s + 20);
    assert_eq!(event["previous_max_steps"], 400);
    let lr = |m: &[serde_json::Value], step: u64| {
        m.iter()
            .rfind(|r| r["step"] == step && r.get("loss").is_some())
            .and_then(|r| r["lr"].as_f64())
            .unwrap_or_else(|| panic!("no step {step}"))
    };
    for step in s..s + 20 {
        let want = 3e-3 + (3e-4 - 3e-3) * (step - s) as f64 / 20.0;
        assert!((lr(&m, step) - want).abs() < 1e-12, "step {step}");
    }
    let last = m.iter().filter(|r| r.get("loss").is_some()).count() as u64;
    assert_eq!(last, s + 20, "the run ends at S + K");

    // A checkpoint inside the cooldown resumes with it, to the same end.
    let inside = (s / 5 + 1) * 5 + 5;
    let ckpt = format!("runs/tiny/checkpoints/step-{inside:08}");
    let (status, out) = run(
        &["--resume", &ckpt, "--local", "--run-dir", "runs/again"],
        dir.path(),
        LIMIT,
    );
    assert!(status.success(), "{out}");
    let again = metrics(&dir.path().join("runs/again"));
    for step in inside..s + 20 {
        assert_eq!(lr(&again, step), lr(&m, step), "step {step}");
    }
    let hash = |m: &[serde_json::Value]| {
        m.iter()
            .rfind(|r| r.get("loss").is_some())
            .map(|r| r["weights_hash"].clone())
    };
    assert_eq!(hash(&again), hash(&m));

    let (code, _, err) = cli(&["decay", "--over", "5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is the job still running?"), "{err}");
}
