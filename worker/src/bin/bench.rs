//! `bench`: where a CPU worker's time goes, and how fast the ring is.
//!
//!     cargo run --release -p stride-worker --bin bench [-- --steps N]
//!
//! Prints, for one worker (no collective), the tokens/s of a training step
//! on `tiny` and on a GPT-2-shaped model small enough for a laptop (4 layers,
//! 256 wide, context 256, vocab 50,304), split into forward, backward,
//! gradient gathering and the optimiser; then the ring all-reduce bandwidth
//! for 4 MiB and 64 MiB buffers with 2 ranks on loopback. All figures of one
//! run come from the same machine state, so ratios between them are fair;
//! absolute numbers vary with the machine. Results go into BENCHMARKS.md.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use stride_job::config::{ConfigSource, ModelConfig, OptimConfig, RawConfig};
use stride_worker::collective::local_ring;
use stride_worker::model::{self, Gpt};
use stride_worker::optim::{AdamW, clip_global_norm};

#[derive(Debug, Parser)]
struct Args {
    /// Timed steps per model (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Repetitions of each all-reduce.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Skip the checkpoint benchmark (it writes ~1.5 GB to --checkpoint-dir).
    #[arg(long)]
    no_checkpoint: bool,
    /// Where the checkpoint benchmark writes (the disk checkpoints go to).
    #[arg(long, default_value = "target/bench-checkpoint")]
    checkpoint_dir: std::path::PathBuf,
    /// Only run the model benchmarks in this process (used by the parent
    /// run to compare allocator settings side by side).
    #[arg(long, hide = true)]
    models_only: bool,
}

#[derive(Debug, Default)]
struct Phases {
    forward: f64,
    backward: f64,
    gather: f64,
    optimizer: f64,
}

fn bench_model(name: &str, c: &ModelConfig, micro_batch: usize, steps: usize) -> Result<()> {
    let dev = Device::Cpu;
    let slots = model::layout(c);
    let mut weights = model::initial_weights(c, 1);
    let gpt = Gpt::new(c, &weights, DType::F32, &dev)?;
    let mut opt = AdamW::new(&OptimConfig::default(), &slots);
    let mut grad = vec![0f32; weights.len()];
    let t = c.context;
    let ids: Vec<u32> = (0..micro_batch * (t + 1))
        .map(|i| (i * 7919 % c.vocab_size) as u32)
        .collect();
    let x: Vec<u32> = ids.chunks(t + 1).flat_map(|w| w[..t].to_vec()).collect();
    let y: Vec<u32> = ids.chunks(t + 1).flat_map(|w| w[1..].to_vec()).collect();
    let x = Tensor::from_vec(x, (micro_batch, t), &dev)?;
    let y = Tensor::from_vec(y, (micro_batch, t), &dev)?;
    let mut p = Phases::default();
    for i in 0..=steps {
        let t0 = Instant::now();
        let loss = gpt.loss(&x, &y)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        for (slot, (_, var)) in slots.iter().zip(gpt.vars()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                grad[slot.offset..slot.offset + slot.len].copy_from_slice(&g);
            }
        }
        let t3 = Instant::now();
        clip_global_norm(&mut grad, 1.0);
        opt.update(&mut weights, &grad, 1e-3);
        gpt.load_flat(&weights)?;
        let t4 = Instant::now();
        if i > 0 {
            p.forward += (t1 - t0).as_secs_f64();
            p.backward += (t2 - t1).as_secs_f64();
            p.gather += (t3 - t2).as_secs_f64();
            p.optimizer += (t4 - t3).as_secs_f64();
        }
    }
    let total = p.forward + p.backward + p.gather + p.optimizer;
    let tokens = (steps * micro_batch * t) as f64;
    println!(
        "{name:<28} {:>6.1}M params  batch {micro_batch}×{t}  {:>8.0} tokens/s  step {:>7.1} ms  (forward {:.0}%, backward {:.0}%, gradient copy {:.0}%, clip+AdamW+load {:.0}%)",
        model::parameter_count(&slots) as f64 / 1e6,
        tokens / total,
        1e3 * total / steps as f64,
        100.0 * p.forward / total,
        100.0 * p.backward / total,
        100.0 * p.gather / total,
        100.0 * p.optimizer / total,
    );
    Ok(())
}

fn bench_ring(mib: usize, reps: usize) -> Result<()> {
    let n = mib * (1 << 20) / 4;
    let times = local_ring(2, |mut c| {
        let mut buf = vec![1.0f32; n];
        let _ = c.all_reduce_sum(&mut buf); // warm-up: connection, page faults
        let start = Instant::now();
        for _ in 0..reps {
            if c.all_reduce_sum(&mut buf).is_err() {
                return f64::NAN;
            }
        }
        start.elapsed().as_secs_f64() / reps as f64
    })?;
    let t = times.iter().copied().fold(0.0, f64::max);
    // Bus bandwidth as NCCL reports it: 2(n−1)/n × bytes / time.
    let bytes = (n * 4) as f64;
    println!(
        "ring all-reduce, 2 ranks, {mib:>3} MiB: {:>7.1} ms  algorithm bandwidth {:>6.2} GB/s  bus bandwidth {:>6.2} GB/s",
        1e3 * t,
        bytes / t / 1e9,
        bytes / t / 1e9 * 2.0 * (2.0 - 1.0) / 2.0
    );
    Ok(())
}

fn models(steps: usize) -> Result<()> {
    let tiny = RawConfig::parse(
        stride_job::config::preset_text("tiny").unwrap_or_default(),
        "tiny".into(),
        ConfigSource::Embedded("tiny"),
    )?
    .resolve()?;
    bench_model("tiny", &tiny.model, tiny.train.micro_batch, steps)?;
    let gpt2_shaped = ModelConfig {
        n_layer: 4,
        n_head: 4,
        n_embd: 256,
        vocab_size: 50_304,
        context: 256,
    };
    bench_model("gpt2-shaped 4L/256/ctx256", &gpt2_shaped, 4, steps)
}

/// Runs the model benchmarks in a child process with `env` set (glibc reads
/// its malloc settings at start-up, so they cannot change in-process) and
/// returns the tokens/s of each model line.
fn child_models(steps: usize, env: &[(&str, &str)], label: &str) -> Result<Vec<f64>> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--models-only", "--steps", &steps.to_string()]);
    cmd.env_remove("MALLOC_MMAP_MAX_")
        .env_remove("MALLOC_TRIM_THRESHOLD_");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rates = Vec::new();
    for line in text.lines() {
        println!("[{label}] {line}");
        let rate = line
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1] == "tokens/s")
            .and_then(|w| w[0].parse::<f64>().ok());
        rates.extend(rate);
    }
    Ok(rates)
}

/// Checkpoint of GPT-2 small (124M parameters: weights + two AdamW moments):
/// the in-memory snapshot (the only stall training sees), the background
/// write with fsync against `dd` of the same size to the same disk, and the
/// load a resume does before its first step.
fn bench_checkpoint(dir: &std::path::Path) -> Result<()> {
    use stride_job::checkpoint;
    let c = ModelConfig::default();
    let slots = model::layout(&c);
    let weights = model::initial_weights(&c, 1);
    let m = weights.iter().map(|w| w * 0.5).collect::<Vec<f32>>();
    let v = weights.iter().map(|w| w * w).collect::<Vec<f32>>();
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    let snapshot = (weights.clone(), m.clone(), v.clone());
    let stall = t.elapsed().as_secs_f64();
    let t = Instant::now();
    checkpoint::write_model(dir, &slots, &snapshot.0)?;
    checkpoint::write_optimizer(dir, &slots, &snapshot.1, &snapshot.2, 1)?;
    let write = t.elapsed().as_secs_f64();
    let bytes: u64 = [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum();
    let dd_file = dir.join("dd.bin");
    let t = Instant::now();
    let dd = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", dd_file.display()))
        .arg("bs=1M")
        .arg(format!("count={}", bytes >> 20))
        .arg("conv=fsync")
        .stderr(std::process::Stdio::null())
        .status()?;
    let dd_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(dd.success(), "dd failed");
    let t = Instant::now();
    let loaded = checkpoint::read_model(dir, &slots)?;
    let (lm, _, _) = checkpoint::read_optimizer(dir, &slots)?;
    let load = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        loaded == weights && lm == m,
        "checkpoint did not round-trip"
    );
    let mb = bytes as f64 / 1e6;
    println!(
        "checkpoint of GPT-2 small ({:.0} MB): snapshot (training stall) {:.0} ms; background write+fsync {:.2} s = {:.0} MB/s; dd conv=fsync {:.2} s = {:.0} MB/s (ratio {:.2}); load for resume {:.2} s",
        mb,
        1e3 * stall,
        write,
        mb / write,
        dd_s,
        mb / dd_s,
        (mb / write) / (mb / dd_s),
        load
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.models_only {
        return models(args.steps);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "stride bench: {cores} cores, Candle CPU with {} threads (RAYON_NUM_THREADS={})",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
    );
    let plain = child_models(args.steps, &[], "glibc default")?;
    let tuned = child_models(
        args.steps,
        &[
            ("MALLOC_MMAP_MAX_", "0"),
            ("MALLOC_TRIM_THRESHOLD_", "4294967296"),
        ],
        "MALLOC_MMAP_MAX_=0 ",
    )?;
    for (i, (a, b)) in plain.iter().zip(&tuned).enumerate() {
        println!(
            "model {i}: tuned allocator / default = {:.2}x tokens/s",
            b / a
        );
    }
    for mib in [4, 64] {
        bench_ring(mib, args.reps)?;
    }
    if !args.no_checkpoint {
        bench_checkpoint(&args.checkpoint_dir)?;
    }
    Ok(())
}
