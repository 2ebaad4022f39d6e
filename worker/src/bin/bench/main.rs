//! `bench`: the worker's training speed and memory next to PyTorch's, the
//! ring all-reduce next to memcpy, two ranks' step with the optimizer
//! state whole and sharded (`--parallel-only`), the device-resident AdamW
//! update (fused in-place pass) next to its Candle-op reference, and a
//! checkpoint next to `dd`.
//!
//!     cargo run --release -p stride-worker --bin bench -- [--pytorch python3] [--steps N]
//!
//! With `--cuda` (a `--features cuda` build, on a GPU) it prints instead
//! the GPU lines: GPT-2 small (124 M) at micro-batch 1 × 1,024 and 16 ×
//! 1,024, the fused CUDA engine and the composed one side by side — ms per
//! step, tokens/s, MFU against the H100's dense bf16 peak (989 TFLOP/s;
//! FLOPs per token 6N + 12·L·C·T, N every parameter), the peak of device
//! memory (the memory pool's high-water mark; cuMemGetInfo's figure
//! beside it) — each step without a CUDA graph (none is built yet). A
//! line that fails (the composed engine out of memory at 16 × 1,024, say)
//! or takes longer than `--line-timeout-s` says so, and the others still
//! run.
//!
//!     bench --cuda [--steps N] [--line-timeout-s S]
//!
//! Each model line is one child process (so its peak RSS is its own) that
//! builds a real `Trainer` on a synthetic corpus and times `Trainer::step`
//! — the code a worker runs, not a copy of it — with one worker (no
//! collective). The children run in turn, never side by side; with
//! `--pytorch PYTHON` the same shapes are trained by
//! `bench/pytorch_baseline.py` (nanoGPT's model, eager) between them, and
//! the ratios are printed. Figures go into BENCHMARKS.md with the machine
//! and the command; only ratios of one run are comparable.

mod checkpoint;
mod collective;
mod lines;
mod measure;
mod parallel;
mod update;

use std::process::Command;

use anyhow::{Context, Result};
use clap::Parser;
use stride_job::config::GradCommDtype;

use crate::checkpoint::{bench_checkpoint, child_load};
use crate::collective::{bench_memcpy, bench_ring, bench_tcp};
use crate::lines::{bench_cuda, child, shapes, stride_line};
use crate::measure::{figure_before, measured};
use crate::parallel::bench_parallel;
use crate::update::{bench_update, child_update};

#[derive(Debug, Parser)]
struct Args {
    /// Timed steps per model line (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Repetitions of each all-reduce.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// A Python with torch installed: also run bench/pytorch_baseline.py.
    #[arg(long, value_name = "PYTHON")]
    pytorch: Option<String>,
    /// Only these shapes (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Skip the composed-engine lines (slow on the large shapes).
    #[arg(long)]
    no_composed: bool,
    /// Skip the checkpoint benchmark (it writes ~3 GB to --checkpoint-dir).
    #[arg(long)]
    no_checkpoint: bool,
    /// Run only the checkpoint benchmark.
    #[arg(long, conflicts_with = "no_checkpoint")]
    checkpoint_only: bool,
    /// Where the checkpoint benchmark writes (the disk checkpoints go to).
    #[arg(long, default_value = "target/bench-checkpoint")]
    checkpoint_dir: std::path::PathBuf,
    /// Run only the data-parallel benchmark (2 ranks on the ring: the
    /// optimizer state whole and sharded).
    #[arg(long, conflicts_with_all = ["checkpoint_only", "update_only"])]
    parallel_only: bool,
    /// Alternating rounds of the data-parallel benchmark (each variant's
    /// best is printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only the optimiser-update benchmark (fused vs Candle ops).
    #[arg(long, conflicts_with = "checkpoint_only")]
    update_only: bool,
    /// Internal: time one device-state update (`fused` or `reference`).
    #[arg(long, hide = true)]
    child_update: Option<String>,
    /// Internal: time one checkpoint load into a device-resident state
    /// (`staged` or `streamed`) from --checkpoint-dir.
    #[arg(long, hide = true)]
    child_load: Option<String>,
    /// Internal: run one model line in this process.
    #[arg(long, hide = true, requires = "engine")]
    child: Option<String>,
    #[arg(long, hide = true)]
    engine: Option<String>,
    /// Internal: leave glibc's malloc at its defaults in the child.
    #[arg(long, hide = true)]
    default_malloc: bool,
    /// The GPU lines only (module doc): fused CUDA and composed engines on
    /// GPT-2 small, at micro-batch 1 and 16 of 1,024 tokens.
    #[arg(long)]
    cuda: bool,
    /// With --cuda: the longest a line may take (its process is killed
    /// after it, and the line says so).
    #[arg(long, default_value_t = 60)]
    line_timeout_s: u64,
    /// Internal: the device of a model line (`cpu` or `cuda`).
    #[arg(long, hide = true, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(kind) = &args.child_update {
        stride_worker::alloc::tune_malloc();
        return child_update(kind, args.steps);
    }
    if let Some(kind) = &args.child_load {
        stride_worker::alloc::tune_malloc();
        return child_load(kind, &args.checkpoint_dir);
    }
    if args.update_only {
        return bench_update(args.steps);
    }
    if args.parallel_only {
        return bench_parallel(args.steps, args.rounds);
    }
    if let (Some(name), Some(engine)) = (&args.child, &args.engine) {
        if !args.default_malloc {
            stride_worker::alloc::tune_malloc();
        }
        return child(name, engine, args.steps, &args.device);
    }
    if args.cuda {
        anyhow::ensure!(
            cfg!(feature = "cuda"),
            "--cuda needs a bench built with CUDA: cargo build --release -p stride-worker --features cuda --bin bench"
        );
        return bench_cuda(
            args.steps,
            std::time::Duration::from_secs(args.line_timeout_s),
        );
    }
    if args.checkpoint_only {
        return bench_checkpoint(&args.checkpoint_dir);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "stride bench: {cores} cores, {} compute threads (RAYON_NUM_THREADS={}), {} timed steps per line",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        args.steps
    );
    let mut summary = Vec::new();
    for shape in shapes() {
        if !args.shapes.is_empty() && !args.shapes.iter().any(|s| s == shape.name) {
            continue;
        }
        let fused = stride_line(shape.name, "fused", args.steps, false)?;
        if let Some(python) = &args.pytorch {
            let mut cmd = Command::new(python);
            cmd.args([
                "bench/pytorch_baseline.py",
                "--shape",
                shape.name,
                "--steps",
                &args.steps.to_string(),
                "--threads",
                &rayon::current_num_threads().to_string(),
            ]);
            let torch = measured(cmd, "pytorch")?;
            summary.push(format!(
                "{:<10} fused / PyTorch eager: {:.2}x tokens/s, {:.2}x peak RSS",
                shape.name,
                fused.0 / torch.0,
                fused.1 / torch.1
            ));
        }
        if !args.no_composed {
            let composed = stride_line(shape.name, "composed", args.steps, false)?;
            summary.push(format!(
                "{:<10} fused / composed:      {:.2}x tokens/s, {:.2}x peak RSS",
                shape.name,
                fused.0 / composed.0,
                fused.1 / composed.1
            ));
        }
        if shape.name == "main" {
            let plain = stride_line(shape.name, "fused", args.steps, true)?;
            summary.push(format!(
                "{:<10} fused, worker's malloc settings / glibc defaults: {:.2}x tokens/s, {:.2}x peak RSS",
                shape.name,
                fused.0 / plain.0,
                fused.1 / plain.1
            ));
        }
    }
    for line in &summary {
        println!("{line}");
    }
    let copy = bench_memcpy(args.reps.max(3));
    let tcp = bench_tcp(args.reps)?;
    bench_ring(4, args.reps, GradCommDtype::F32)?;
    let ring = bench_ring(64, args.reps, GradCommDtype::F32)?;
    let ring_bf16 = bench_ring(64, args.reps, GradCommDtype::Bf16)?;
    let mut ratios = format!(
        "ring all-reduce 64 MiB: {:.2}x memcpy, {:.2}x one-way TCP; bf16 wire / f32 wire: {:.2}x",
        ring / copy,
        ring / tcp,
        ring_bf16 / ring
    );
    if let Some(python) = &args.pytorch {
        let mut cmd = Command::new(python);
        cmd.args([
            "bench/gloo_allreduce.py",
            "--mib",
            "64",
            "--reps",
            &args.reps.to_string(),
        ]);
        let out = cmd.output().context("cannot run bench/gloo_allreduce.py")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.starts_with("gloo")) {
            println!("{line}");
            let gloo = figure_before(line, "GB/s");
            ratios.push_str(&format!(", {:.2}x gloo", ring / gloo));
        }
    }
    println!("{ratios}");
    bench_parallel(args.steps, args.rounds)?;
    bench_update(args.steps)?;
    if !args.no_checkpoint {
        bench_checkpoint(&args.checkpoint_dir)?;
    }
    Ok(())
}
