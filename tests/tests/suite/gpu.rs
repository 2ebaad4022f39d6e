//! GPU tests: `#[ignore]`d, so a machine without GPUs (CI) reports them as
//! ignored rather than passed. Run them on a machine with NVIDIA GPUs, the
//! driver and NCCL, after building the worker with CUDA:
//!
//!     cargo test --workspace --features stride-worker/cuda --test suite gpu:: -- --ignored
//!     STRIDE_TEST_CUDA=1 cargo test -p stride-worker --features cuda gpu nccl -- --ignored
//!
//! or, on a machine without Rust, from the folder `bash .ci/gpu-bundle`
//! builds: `target/gpu-bundle/stride-gpu/run`. The NCCL all-reduce against a
//! CPU sum (1..=N GPUs) lives next to the NCCL code, in
//! `worker/src/collective/nccl.rs`; the device-resident step's checks in
//! `worker/src/trainer.rs` (`mod gpu`).

use std::time::Duration;

use crate::common::{metrics, run};

const LIMIT: Duration = Duration::from_secs(600);

/// `tiny` for 20 steps on one worker, on `device` in f32.
fn tiny_losses(dir: &std::path::Path, device: &str, extra: &[&str]) -> Vec<f64> {
    let mut args = vec![
        "--config",
        "tiny",
        "--workers",
        "1",
        "--local",
        "--set",
        "train.max_steps=20",
        "--set",
        "train.warmup_steps=5",
        "--set",
        "worker.precision=f32",
    ];
    let device = format!("worker.device={device}");
    args.extend_from_slice(&["--set", &device]);
    args.extend_from_slice(extra);
    let (status, out) = run(&args, dir, LIMIT);
    assert!(status.success(), "{out}");
    metrics(&dir.join("runs/tiny"))
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .collect()
}

#[test]
#[ignore = "needs NVIDIA GPUs and a CUDA build: see the module doc"]
fn tiny_on_cuda_matches_the_cpu_run() {
    let _turn = crate::common::beside_others();
    let (cpu, gpu) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let a = tiny_losses(cpu.path(), "cpu", &[]);
    let b = tiny_losses(gpu.path(), "cuda", &[]);
    // Both runs trained every step: an empty metrics file must not pass.
    assert_eq!((a.len(), b.len()), (20, 20), "losses logged by each run");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-3, "step {step}: cpu {x} vs cuda {y}");
    }
}

#[test]
#[ignore = "needs NVIDIA GPUs and a CUDA build: see the module doc"]
fn a_cpu_checkpoint_resumes_on_cuda() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let cpu = tiny_losses(d.path(), "cpu", &["--set", "checkpoint.interval=10"]);
    assert_eq!(cpu.len(), 20, "losses logged by the CPU run");
    let resumed = {
        let (status, out) = run(
            &[
                "--resume",
                "runs/tiny/checkpoints/step-00000010",
                "--local",
                "--set",
                "worker.device=cuda",
                "--set",
                "worker.precision=f32",
                "--run-dir",
                "runs/gpu",
            ],
            d.path(),
            LIMIT,
        );
        assert!(status.success(), "{out}");
        metrics(&d.path().join("runs/gpu"))
            .iter()
            .filter_map(|r| r["loss"].as_f64())
            .collect::<Vec<_>>()
    };
    assert_eq!(resumed.len(), 10, "steps 10..20 on the GPU");
    for (i, (x, y)) in cpu[10..].iter().zip(&resumed).enumerate() {
        assert!((x - y).abs() < 1e-3, "step {}: cpu {x} vs cuda {y}", 10 + i);
    }
}
