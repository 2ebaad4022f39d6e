//! One table of bad inputs for the coordinator and the worker: each gets one
//! clear error naming the file, key or rank, a non-zero exit code, and no
//! change to an existing checkpoint folder.

use std::time::Duration;

use crate::common::{copy_folder, eventually, run, snapshot, spawn};
use stride_job::tokens::write_nanogpt;

#[test]
fn every_bad_input_is_one_clear_error_and_damages_nothing() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path();
    // A run with checkpoints at steps 2 and 4, which no case may touch.
    let (status, out) = run(
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--local",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "checkpoint.interval=2",
            "--set",
            "train.eval_interval=0",
        ],
        dir,
        Duration::from_secs(300),
    );
    assert!(status.success(), "{out}");
    let ckpts = dir.join("runs/tiny/checkpoints");

    // Inputs on disk.
    std::fs::write(dir.join("malformed.toml"), "[train\nlr = 1e-3\n").expect("w");
    std::fs::write(dir.join("unknown.toml"), "[train]\nlearning_rate = 1e-3\n").expect("w");
    std::fs::write(
        dir.join("wrongtype.toml"),
        "[train]\nmax_steps = \"many\"\n",
    )
    .expect("w");
    std::fs::write(
        dir.join("impossible.toml"),
        "[train]\nmax_steps = 10\nwarmup_steps = 11\n",
    )
    .expect("w");
    std::fs::write(dir.join("odd.bin"), [1u8, 0, 2]).expect("w");
    write_nanogpt(&dir.join("bigid.bin"), &[7u16, 200, 3].repeat(100)).expect("w");
    let corrupted = dir.join("corrupted");
    copy_folder(&ckpts, &corrupted);
    let model = corrupted.join("step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&model).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, bytes).expect("write");
    let corrupted_step = corrupted.join("step-00000004");
    let corrupted_step = corrupted_step.to_str().expect("utf8");

    // A live coordinator holding runs/live and a checkpoint folder given
    // as an absolute path (as a shared volume would be).
    let live_ckpts = format!("checkpoint.dir={}", dir.join("live-ckpts").display());
    let mut live = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--listen",
            "127.0.0.1:0",
            "--run-dir",
            "runs/live",
            "--set",
            &live_ckpts,
            "--set",
            "cluster.startup_timeout_s=3600",
        ],
        dir,
        "live.out",
    );
    let addr = dir.join("runs/live/coordinator.addr");
    let live_url = eventually(Duration::from_secs(60), "the live coordinator", || {
        std::fs::read_to_string(&addr)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    });
    // Files that are not regular files: each would block or never end.
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    std::fs::write(dir.join("wrong-token"), "not-the-job-token\n").expect("w");

    let fresh = [
        "--set",
        "checkpoint.dir=elsewhere",
        "--run-dir",
        "runs/elsewhere",
    ];
    // (binary, arguments, exit code, what the message must name)
    let cases: Vec<(&str, Vec<&str>, i32, Vec<&str>)> = vec![
        (
            "coordinator",
            vec!["--config", "malformed.toml"],
            2,
            vec!["malformed.toml", "not valid TOML"],
        ),
        (
            "coordinator",
            vec!["--config", "unknown.toml"],
            2,
            vec!["unknown.toml", "train.learning_rate"],
        ),
        (
            "coordinator",
            vec!["--config", "wrongtype.toml"],
            2,
            vec!["wrongtype.toml", "train.max_steps", "wrong type"],
        ),
        (
            "coordinator",
            vec!["--config", "impossible.toml"],
            2,
            vec!["impossible.toml", "train.warmup_steps"],
        ),
        (
            "coordinator",
            vec!["--set", "data.train=missing.bin"],
            2,
            vec!["missing.bin", "cannot open"],
        ),
        (
            "coordinator",
            vec!["--set", "data.train=odd.bin"],
            2,
            vec!["odd.bin", "odd length"],
        ),
        (
            "coordinator",
            vec![
                "--set",
                "data.train=bigid.bin",
                "--set",
                "data.val_fraction=0.5",
                "--set",
                "model.context=8",
            ],
            2,
            vec!["bigid.bin", "token id 200", "model.vocab_size = 128"],
        ),
        (
            "coordinator",
            vec!["--resume", corrupted_step],
            2,
            vec![
                corrupted_step,
                "model.safetensors does not match its sha256",
            ],
        ),
        (
            "coordinator",
            vec![
                "--resume",
                "runs/tiny/checkpoints/latest",
                "--extend-steps",
                "4",
            ],
            2,
            vec!["--extend-steps 4", "(4)"],
        ),
        (
            "coordinator",
            vec!["--resume", "runs/nonexistent/checkpoints/latest"],
            2,
            vec!["runs/nonexistent/checkpoints/latest", "does not exist"],
        ),
        (
            "coordinator",
            vec!["--workers", "0"],
            2,
            vec!["--workers 0", "cluster.workers"],
        ),
        (
            "coordinator",
            vec!["--set", "model.n_embd=99999999999"],
            2,
            vec!["model.n_embd", "must be at most 65536"],
        ),
        (
            "coordinator",
            vec!["--set", "model.context=18446744073709551615"],
            2,
            vec!["model.context", "wrong type"],
        ),
        (
            "coordinator",
            vec!["--set", "train.micro_batch=9999999999"],
            2,
            vec!["train.micro_batch", "must be at most 1048576"],
        ),
        (
            "coordinator",
            vec!["--set", "optim.eps=inf"],
            2,
            vec!["optim.eps", "positive number"],
        ),
        (
            "coordinator",
            vec!["--set", "cluster.step_timeout_s=1e20"],
            2,
            vec!["cluster.step_timeout_s", "at most 1000000"],
        ),
        (
            "coordinator",
            vec![
                "--resume",
                "runs/tiny/checkpoints/latest",
                "--extend-steps",
                "99999999999999999",
            ],
            2,
            vec!["--extend-steps", "1..=1099511627776"],
        ),
        (
            "coordinator",
            vec![
                "--resume",
                "runs/tiny/checkpoints/latest",
                "--extend-steps",
                "40",
                "--decay",
                "sqrt",
            ],
            2,
            vec![
                "invalid value 'sqrt' for '--decay <SHAPE>'",
                "[possible values: cosine, linear, 1-sqrt]",
                "a similar value exists: '1-sqrt'",
            ],
        ),
        (
            "coordinator",
            vec![
                "--resume",
                "runs/tiny/checkpoints/latest",
                "--decay",
                "linear",
            ],
            2,
            vec!["--extend-steps"],
        ),
        (
            "worker",
            vec!["--connect", "http://127.0.0.1:9", "--threads", "100000"],
            2,
            vec!["--threads", "0..=4096"],
        ),
        (
            "coordinator",
            vec!["--set", "data.val_fraction=0.0001"],
            2,
            vec![
                "data.val_fraction",
                "shorter than one validation window of model.context + 1 = 65",
            ],
        ),
        (
            "coordinator",
            vec![
                "--set",
                "worker.engine=fused",
                "--set",
                "worker.precision=bf16",
            ],
            2,
            vec!["worker.engine", "computes in f32"],
        ),
        (
            "coordinator",
            vec![
                "--set",
                "worker.engine=fused",
                "--set",
                "worker.device=cuda",
                "--set",
                "model.n_embd=96",
                "--set",
                "model.n_head=8",
            ],
            2,
            vec![
                "worker.engine",
                "CUDA kernels do not take this model",
                "`model.n_head`",
                "head size n_embd / n_head = 96 / 8 = 12",
            ],
        ),
        (
            "coordinator",
            vec!["--config", "tiny", "--set", "cluster.collective=nccl"],
            2,
            vec!["`cluster.collective` = nccl", "worker.device is `cpu`"],
        ),
        (
            "coordinator",
            vec![
                "--config",
                "tiny",
                "--set",
                "worker.device=cuda",
                "--set",
                "train.grad_comm_dtype=bf16",
            ],
            2,
            vec![
                "`train.grad_comm_dtype` = bf16",
                "NCCL carries the gradient in f32",
            ],
        ),
        (
            "coordinator",
            vec![
                "--config",
                "tiny",
                "--set",
                "worker.engine=composed",
                "--set",
                "train.shard_optimizer=true",
            ],
            2,
            vec![
                "`train.shard_optimizer` = on",
                "the composed one, which keeps it whole",
            ],
        ),
        (
            "coordinator",
            vec!["--config", "tiny", "--set", "train.shard_optimizer=maybe"],
            2,
            vec!["`train.shard_optimizer`", "`auto`", "`on`", "`off`"],
        ),
        (
            "coordinator",
            vec![
                "--config",
                "tiny",
                "--listen",
                "127.0.0.1:0",
                "--run-dir",
                "runs/live",
                "--set",
                "checkpoint.dir=live2",
            ],
            2,
            vec!["runs/live", "in use by another coordinator"],
        ),
        (
            "worker",
            vec!["--connect", "http://127.0.0.1:9", "--connect-timeout", "1"],
            1,
            vec!["no coordinator answered at http://127.0.0.1:9"],
        ),
        (
            "worker",
            vec![
                "--connect",
                "http://127.0.0.1:9",
                "--token-file",
                "missing-token",
            ],
            2,
            vec!["missing-token"],
        ),
        (
            "worker",
            vec!["--connect", &live_url, "--token-file", "wrong-token"],
            2,
            vec!["refused registration", "wrong job token"],
        ),
        (
            "worker",
            vec!["--connect", "http://127.0.0.1:9", "--token-file", "fifo"],
            2,
            vec!["fifo", "a FIFO"],
        ),
        (
            "coordinator",
            vec!["--config", "fifo"],
            2,
            vec!["fifo", "a FIFO"],
        ),
        (
            "coordinator",
            vec!["--set", "data.train=fifo"],
            2,
            vec!["fifo", "a FIFO"],
        ),
        (
            "coordinator",
            vec!["--token-file", "fifo", "--listen", "127.0.0.1:0"],
            2,
            vec!["fifo", "a FIFO"],
        ),
        (
            // Another run directory, but the live job's checkpoint folder.
            "coordinator",
            vec![
                "--config",
                "tiny",
                "--listen",
                "127.0.0.1:0",
                "--run-dir",
                "runs/live3",
                "--set",
                &live_ckpts,
            ],
            2,
            vec!["live-ckpts is in use by another coordinator"],
        ),
    ];
    let before = (snapshot(&ckpts), snapshot(&corrupted));
    for (binary, args, code, needles) in cases {
        let mut argv: Vec<&str> = args.clone();
        let needs_fresh =
            binary == "coordinator" && !args.contains(&"--resume") && !args.contains(&"--run-dir");
        if needs_fresh {
            argv.extend_from_slice(&fresh);
        }
        if binary == "coordinator" && !args.contains(&"--listen") {
            argv.push("--local");
        }
        let out = std::process::Command::new(crate::common::bin(binary))
            .args(&argv)
            .current_dir(dir)
            .env("STRIDE_TOKEN", crate::common::TOKEN)
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(code), "{binary} {argv:?}:\n{text}");
        for n in needles {
            assert!(
                text.contains(n),
                "{binary} {argv:?}: the message lacks `{n}`:\n{text}"
            );
        }
        assert!(
            !text.contains("panicked"),
            "{binary} {argv:?} panicked:\n{text}"
        );
        assert_eq!(
            before,
            (snapshot(&ckpts), snapshot(&corrupted)),
            "{binary} {argv:?} changed a checkpoint"
        );
    }
    assert!(
        live.child.try_wait().expect("wait").is_none(),
        "the live coordinator must be unharmed"
    );

    // `report` on something that is not a run directory.
    std::fs::create_dir_all(dir.join("runs/empty")).expect("mkdir");
    std::fs::write(dir.join("runs/empty/metrics.jsonl"), "").expect("w");
    for (run_dir, needle) in [
        ("runs/none", "RUN_DIR must be a run directory"),
        ("runs/empty", "no step has been recorded yet"),
    ] {
        let out = std::process::Command::new(crate::common::bin("coordinator"))
            .args(["report", run_dir])
            .current_dir(dir)
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "report {run_dir}: {text}");
        assert!(text.contains(needle), "report {run_dir}: {text}");
        assert!(!dir.join(run_dir).join("report.png").exists());
    }
    // Several runs, one of them not a run: nothing is drawn at all; an
    // unknown metric is refused before anything is read.
    for (args, needle) in [
        (
            vec!["report", "runs/tiny", "runs/none"],
            "runs/none/metrics.jsonl",
        ),
        (
            vec!["report", "runs/tiny", "--metric", "accuracy"],
            "unknown metric `accuracy`",
        ),
    ] {
        let out = std::process::Command::new(crate::common::bin("coordinator"))
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert!(!dir.join("compare.png").exists(), "{args:?}");
        assert!(!dir.join("runs/tiny/report.png").exists(), "{args:?}");
    }

    // Trace settings Stride cannot honour are refused before anything starts.
    for (vars, needle) in [
        (
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
            "OTLP/gRPC only",
        ),
        (
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            "http://HOST:4317",
        ),
    ] {
        for (binary, args) in [
            (
                "coordinator",
                vec!["--config", "tiny", "--local", "--run-dir", "runs/otel"],
            ),
            ("worker", vec!["--connect", "http://127.0.0.1:9"]),
        ] {
            let out = std::process::Command::new(crate::common::bin(binary))
                .args(&args)
                .envs(vars)
                .current_dir(dir)
                .env("STRIDE_TOKEN", crate::common::TOKEN)
                .output()
                .expect("runs");
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{binary} {vars:?}: {text}");
            assert!(text.contains(needle), "{binary} {vars:?}: {text}");
        }
        assert!(
            !dir.join("runs/otel").exists(),
            "a refused run left a directory"
        );
    }
}

/// A worker whose token file differs from the coordinator's (same path,
/// other content — e.g. a stale copy on one machine) is refused by name
/// when it joins, with both files' lengths and hashes (exit 2), before
/// any step runs; the coordinator waits on for a worker that can join.
#[test]
fn a_worker_reading_other_data_is_refused_before_training() {
    let _turn = crate::common::beside_others();
    let coordinator_dir = tempfile::tempdir().expect("tmp");
    let worker_dir = tempfile::tempdir().expect("tmp");
    for (dir, mul) in [(coordinator_dir.path(), 7u16), (worker_dir.path(), 11)] {
        std::fs::create_dir_all(dir.join("data")).expect("mkdir");
        let tokens: Vec<u16> = (0..4000u16).map(|i| i.wrapping_mul(mul) % 100).collect();
        write_nanogpt(&dir.join("data/train.bin"), &tokens).expect("write");
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
            "data.train=data/train.bin",
            "--set",
            "model.context=16",
            "--set",
            "data.stride=16",
            "--set",
            "cluster.startup_timeout_s=5",
        ],
        coordinator_dir.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(coordinator_dir.path(), "tiny", &mut coord);
    let mut worker = spawn("worker", &["--connect", &url], worker_dir.path(), "w.out");
    let code = worker.wait(Duration::from_secs(60)).code();
    let wout = std::fs::read_to_string(worker_dir.path().join("w.out")).unwrap_or_default();
    assert_eq!(code, Some(2), "{wout}");
    let status = coord.wait(Duration::from_secs(120));
    let out = std::fs::read_to_string(coordinator_dir.path().join("c.out")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{out}");
    for text in [&out, &wout] {
        assert!(
            text.contains("train data differs from the job's")
                && text.contains("the worker's data/train.bin")
                && text.contains("the coordinator's data/train.bin")
                && text.matches("3600 tokens, xxh3").count() >= 2,
            "{text}"
        );
    }
    assert!(out.contains("only 0 of 1 workers joined"), "{out}");
    assert!(!out.contains("step      0"), "no step may run: {out}");
}
