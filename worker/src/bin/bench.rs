//! `bench`: the worker's training speed and memory next to PyTorch's, the
//! ring all-reduce next to memcpy, the device-resident AdamW update (fused
//! in-place pass) next to its Candle-op reference, and a checkpoint next
//! to `dd`.
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

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use stride_job::config::{Config, ConfigSource, ModelConfig, RawConfig};
use stride_worker::collective::{Solo, local_ring};
use stride_worker::device_state::DeviceState;
use stride_worker::model;
use stride_worker::trainer::Trainer;
use stride_worker::transfer::Transfers;

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

/// A model shape the bench trains: name, model, micro-batch.
struct Shape {
    name: &'static str,
    model: ModelConfig,
    batch: usize,
}

fn shapes() -> Vec<Shape> {
    let gpt = |n_layer, n_head, n_embd, vocab_size, context| ModelConfig {
        n_layer,
        n_head,
        n_embd,
        vocab_size,
        context,
    };
    vec![
        // The `tiny` preset's model and micro-batch.
        Shape {
            name: "tiny",
            model: gpt(2, 2, 64, 128, 64),
            batch: 16,
        },
        // GPT-2 vocabulary, 4 layers of 256, context 256: the main shape.
        Shape {
            name: "main",
            model: gpt(4, 4, 256, 50_304, 256),
            batch: 8,
        },
        // Attention-heavy: context 1024.
        Shape {
            name: "attention",
            model: gpt(2, 4, 256, 50_304, 1024),
            batch: 2,
        },
    ]
}

/// The GPU lines' shapes: GPT-2 small at context 1,024, micro-batch 1 and 16.
fn cuda_shapes() -> Vec<Shape> {
    [("gpt2-1x1024", 1), ("gpt2-16x1024", 16)]
        .into_iter()
        .map(|(name, batch)| Shape {
            name,
            model: ModelConfig::default(),
            batch,
        })
        .collect()
}

/// The H100 SXM's dense bf16 peak, the MFU's denominator.
const H100_PEAK_FLOPS: f64 = 989e12;

/// Training FLOPs per token of a GPT (PaLM's estimate, nanoGPT's MFU):
/// 6N for the parameters' products forward and backward, 12·L·C·T for
/// attention's.
fn flops_per_token(parameters: usize, m: &ModelConfig) -> f64 {
    6.0 * parameters as f64 + 12.0 * (m.n_layer * m.n_embd * m.context) as f64
}

/// A resolved job config for `shape` on one CPU worker with `engine`.
fn config(shape: &Shape, engine: &str) -> Result<Config> {
    let m = &shape.model;
    let text = format!(
        "[model]\nn_layer = {}\nn_head = {}\nn_embd = {}\nvocab_size = {}\ncontext = {}\n\
         [data]\nsynthetic_tokens = {}\n\
         [train]\nglobal_batch = {b}\nmicro_batch = {b}\nwarmup_steps = 0\n\
         [worker]\nengine = \"{engine}\"\n[cluster]\nworkers = 1\n",
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.vocab_size,
        m.context,
        (shape.batch + 2) * (m.context + 1) * 4,
        b = shape.batch,
    );
    Ok(RawConfig::parse(
        &text,
        "bench".into(),
        ConfigSource::File("bench.toml".into()),
    )?
    .resolve()?)
}

/// This process's peak resident set (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// A memory figure of this process's `/proc/self/status`, in MB.
fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Candle's device for a model line.
fn open_device(device: &str) -> Result<Device> {
    match device {
        "cpu" => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        "cuda" => anyhow::bail!("this bench was built without CUDA: --features cuda"),
        other => anyhow::bail!("no device {other} (cpu or cuda)"),
    }
}

/// Device memory of `device`'s GPU: the memory pool's high-water mark and
/// what cuMemGetInfo says is in use (total − free), in MB; NaN where
/// unknown (a CPU, a context without pools).
#[cfg(feature = "cuda")]
fn device_memory_mb(device: &Device) -> (f64, f64) {
    let Ok(cuda) = device.as_cuda_device() else {
        return (f64::NAN, f64::NAN);
    };
    let stream = cuda.cuda_stream();
    let mb = |b: u64| b as f64 / 1e6;
    let peak = stride_cuda_kernels::gpu::pool_peak_bytes(&stream)
        .ok()
        .flatten()
        .map_or(f64::NAN, mb);
    let used = stream
        .context()
        .mem_get_info()
        .map_or(f64::NAN, |(free, total)| mb((total - free) as u64));
    (peak, used)
}

#[cfg(not(feature = "cuda"))]
fn device_memory_mb(_: &Device) -> (f64, f64) {
    (f64::NAN, f64::NAN)
}

/// One GPU model line, in this (child) process: two warm-up steps (the
/// first one's cuBLASLt heuristics and, for the composed engine, the PTX
/// compilation of Candle's kernels), then `steps` timed `Trainer::step`s,
/// each ending in the step's read of its scalars (so its time is the
/// device's).
fn child_cuda(shape: &Shape, engine: &str, steps: usize) -> Result<()> {
    let c = config(shape, engine)?;
    let device = open_device("cuda")?;
    let (_, used_before) = device_memory_mb(&device);
    let mut trainer = Trainer::new(&c, Box::new(Solo), 1, device.clone())?;
    let samples: Vec<u64> = (0..shape.batch as u64).collect();
    for _ in 0..2 {
        trainer.step(&samples, 1e-4)?;
    }
    let (mut total, mut moved) = (0.0, 0);
    for _ in 0..steps {
        let o = trainer.step(&samples, 1e-4)?;
        total += o.total_s;
        moved = o.host_device_bytes;
    }
    let (peak, used_after) = device_memory_mb(&device);
    let parameters = model::parameter_count(trainer.slots());
    let step_s = total / steps.max(1) as f64;
    let tokens = (shape.batch * shape.model.context) as f64;
    let mfu = tokens / step_s * flops_per_token(parameters, &shape.model) / H100_PEAK_FLOPS;
    println!(
        "stride {:<8} {:<12} cuda  {:>5.1}M params  batch {}x{}  {} without CUDA graph: {:>7.2} ms/step  {:>8.0} tokens/s  MFU {:>5.1}% of 989 TFLOP/s  peak device memory {:>6.0} MB (pool high-water; cuMemGetInfo in use {:.0} MB, {:.0} MB before the trainer)  host<->device {moved} B/step",
        trainer.engine_name(),
        shape.name,
        parameters as f64 / 1e6,
        shape.batch,
        shape.model.context,
        trainer.engine_description(),
        1e3 * step_s,
        tokens / step_s,
        100.0 * mfu,
        peak,
        used_after,
        used_before,
    );
    Ok(())
}

/// One model line, in this (child) process: `steps` timed `Trainer::step`s
/// after a warm-up step.
fn child(name: &str, engine: &str, steps: usize, device: &str) -> Result<()> {
    if device == "cuda" {
        let shape = cuda_shapes()
            .into_iter()
            .chain(shapes())
            .find(|s| s.name == name)
            .with_context(|| format!("no shape {name}"))?;
        return child_cuda(&shape, engine, steps);
    }
    let shape = shapes()
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no shape {name}"))?;
    let c = config(&shape, engine)?;
    let mut trainer = Trainer::new(&c, Box::new(Solo), 1, open_device(device)?)?;
    let samples: Vec<u64> = (0..shape.batch as u64).collect();
    trainer.step(&samples, 1e-3)?;
    let (mut total, mut compute, mut moved) = (0.0, 0.0, 0);
    for _ in 0..steps {
        let o = trainer.step(&samples, 1e-3)?;
        total += o.total_s;
        compute += o.compute_s;
        moved = o.host_device_bytes;
    }
    let tokens = (steps * shape.batch * shape.model.context) as f64;
    println!(
        "stride {:<8} {:<10} {:>5.1}M params  batch {}x{}  {:>8.0} tokens/s  step {:>7.1} ms  peak RSS {:>6.0} MB  (forward+backward {:.0}%, all-reduce+clip+AdamW {:.0}%; host<->device {moved} B/step)",
        trainer.engine_name(),
        name,
        model::parameter_count(trainer.slots()) as f64 / 1e6,
        shape.batch,
        shape.model.context,
        tokens / total,
        1e3 * total / steps as f64,
        peak_rss_mb(),
        100.0 * compute / total,
        100.0 * (total - compute) / total,
    );
    Ok(())
}

/// The number just before `unit` in a printed line (NaN if none).
fn figure_before(line: &str, unit: &str) -> f64 {
    line.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == unit)
        .and_then(|w| w[0].parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// Runs a command, echoes its output lines that match `keep`, and returns
/// (tokens/s, peak RSS MB) parsed from the last of them.
fn measured(cmd: Command, keep: &str) -> Result<(f64, f64)> {
    measured_in(cmd, keep, "tokens/s")
}

/// [`measured`] with the first figure the one before `unit`.
fn measured_in(mut cmd: Command, keep: &str, unit: &str) -> Result<(f64, f64)> {
    let out = cmd.output().context("cannot start a bench child")?;
    figures_of(&out, keep, unit)
}

/// [`measured`], but the child is killed after `limit` (a GPU line that
/// hangs or crawls must not take the others' time).
fn measured_within(mut cmd: Command, keep: &str, limit: std::time::Duration) -> Result<(f64, f64)> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a bench child")?;
    // Drained while it runs, so a full pipe never stalls it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let joined = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    let (stdout, stderr) = (joined(stdout), joined(stderr));
    let Some(status) = status else {
        anyhow::bail!("stopped after {} s (--line-timeout-s)", limit.as_secs());
    };
    figures_of(
        &std::process::Output {
            status,
            stdout,
            stderr,
        },
        keep,
        "tokens/s",
    )
}

/// The figures of a child's last line that starts with `keep` (each such
/// line echoed): the one before `unit`, and the one before "MB".
fn figures_of(out: &std::process::Output, keep: &str, unit: &str) -> Result<(f64, f64)> {
    anyhow::ensure!(
        out.status.success(),
        "bench child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut figures = (f64::NAN, f64::NAN);
    for line in text.lines().filter(|l| l.starts_with(keep)) {
        println!("{line}");
        figures = (figure_before(line, unit), figure_before(line, "MB"));
    }
    Ok(figures)
}

fn stride_line(name: &str, engine: &str, steps: usize, default_malloc: bool) -> Result<(f64, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--child",
        name,
        "--engine",
        engine,
        "--steps",
        &steps.to_string(),
    ]);
    if default_malloc {
        cmd.arg("--default-malloc");
    }
    measured(cmd, "stride")
}

/// The GPU lines (module doc), one child each, the fused engine next to the
/// composed one on every shape; a failed line is reported and skipped.
fn bench_cuda(steps: usize, line_timeout: std::time::Duration) -> Result<()> {
    let line = |name: &str, engine: &str| -> Option<(f64, f64)> {
        let mut cmd = match std::env::current_exe() {
            Ok(exe) => Command::new(exe),
            Err(e) => {
                println!("stride {engine:<8} {name:<12} cuda  failed: {e}");
                return None;
            }
        };
        cmd.args([
            "--child",
            name,
            "--engine",
            engine,
            "--device",
            "cuda",
            "--steps",
            &steps.to_string(),
        ]);
        match measured_within(cmd, "stride", line_timeout) {
            Ok(figures) => Some(figures),
            Err(e) => {
                // The child's error and its causes, without a backtrace.
                let text = format!("{e:#}");
                let text = text.split("Stack backtrace:").next().unwrap_or_default();
                let why: String = text
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(400)
                    .collect();
                println!("stride {engine:<8} {name:<12} cuda  failed: {why}");
                None
            }
        }
    };
    println!(
        "stride bench --cuda: GPT-2 small, {steps} timed steps per line after 2 warm-up steps (at most {} s a line), one GPU, without CUDA graph",
        line_timeout.as_secs()
    );
    let mut summary = Vec::new();
    for shape in cuda_shapes() {
        let fused = line(shape.name, "fused");
        let composed = line(shape.name, "composed");
        if let (Some(f), Some(c)) = (fused, composed) {
            summary.push(format!(
                "{:<12} fused / composed on CUDA: {:.2}x tokens/s, {:.2}x peak device memory",
                shape.name,
                f.0 / c.0,
                f.1 / c.1
            ));
        }
    }
    for line in &summary {
        println!("{line}");
    }
    Ok(())
}

fn bench_ring(mib: usize, reps: usize) -> Result<f64> {
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
    let gbs = (n * 4) as f64 / t / 1e9;
    // For 2 ranks the bus bandwidth (NCCL's 2(n−1)/n × bytes / time) equals the algorithm bandwidth.
    println!(
        "ring all-reduce, 2 ranks, {mib:>3} MiB: {:>7.1} ms  algorithm bandwidth {gbs:>6.2} GB/s",
        1e3 * t
    );
    Ok(gbs)
}

/// Single-thread copy of a 64 MiB buffer into another (both faulted in).
fn bench_memcpy(reps: usize) -> f64 {
    let n = 16 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for i in 0..reps {
        dst.copy_from_slice(&src);
        dst[i] += 1.0;
    }
    let t = start.elapsed().as_secs_f64() / reps as f64;
    let gbs = (n * 4) as f64 / t / 1e9;
    println!(
        "memcpy, one thread,   64 MiB: {:>7.1} ms  {gbs:>6.2} GB/s",
        1e3 * t
    );
    gbs
}

/// One-way TCP over loopback, 64 MiB a message, one thread each side: the
/// ceiling under any TCP all-reduce on this machine.
fn bench_tcp(reps: usize) -> Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let n = 64 << 20;
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; n];
        for _ in 0..=reps {
            s.read_exact(&mut buf)?;
        }
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let data = vec![1u8; n];
    s.write_all(&data)?; // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        s.write_all(&data)?;
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let t = start.elapsed().as_secs_f64() / reps as f64;
    let gbs = n as f64 / t / 1e9;
    println!(
        "TCP loopback, one way, 64 MiB: {:>7.1} ms  {gbs:>6.2} GB/s",
        1e3 * t
    );
    Ok(gbs)
}

/// Checkpoint of GPT-2 small (124M parameters: weights plus two AdamW
/// moments), each part next to its reference in the same run:
/// - the training stall: the snapshot into buffers kept from the last
///   checkpoint (what rank 0 does from its second checkpoint on) next to
///   an allocating copy (the first checkpoint, and every one before);
/// - the write with fsync and sha256: the streaming writer next to the
///   safetensors crate's (then hashed by reading back) and next to
///   `dd conv=fsync` of the same size to the same disk;
/// - the resume: the coordinator's sha256 of both files while the worker
///   reads them straight into its buffers (now), next to the sha256 first
///   and the read after (before), to the reference reader and to reading
///   the files once; the page cache is dropped for the files before each
///   read (`dd iflag=nocache`), so reads come from the disk. A worker on
///   another machine reads its own disk while the coordinator hashes from
///   its own: the longer of the two measured alone. (Both at once from
///   two copies of the files on this one disk is printed too: that
///   measures the disk's contention between two streams, which two
///   machines do not share.)
fn bench_checkpoint(dir: &std::path::Path) -> Result<()> {
    use stride_job::checkpoint;
    let c = ModelConfig::default();
    let slots = model::layout(&c);
    let weights = model::initial_weights(&c, 1);
    let m = weights.iter().map(|w| w * 0.5).collect::<Vec<f32>>();
    let v = weights.iter().map(|w| w * w).collect::<Vec<f32>>();
    std::fs::create_dir_all(dir)?;
    let secs = |t: Instant| t.elapsed().as_secs_f64();

    // The stall: allocating copies, then copies into those (now touched)
    // buffers, as `Trainer::snapshot` does once a snapshot was written.
    let t = Instant::now();
    let mut snap = (weights.clone(), m.clone(), v.clone());
    let stall_alloc = secs(t);
    let t = Instant::now();
    snap.0.copy_from_slice(&weights);
    snap.1.copy_from_slice(&m);
    snap.2.copy_from_slice(&v);
    let stall = secs(t);

    let write = |dir: &std::path::Path, reference: bool| -> Result<f64> {
        std::fs::create_dir_all(dir)?;
        let t = Instant::now();
        if reference {
            checkpoint::reference::write_model(dir, &slots, &snap.0)?;
            checkpoint::reference::write_optimizer(dir, &slots, &snap.1, &snap.2, 1)?;
        } else {
            checkpoint::write_model(dir, &slots, &snap.0)?;
            checkpoint::write_optimizer(dir, &slots, &snap.1, &snap.2, 1)?;
        }
        Ok(secs(t))
    };
    let (old_dir, new_dir) = (dir.join("reference"), dir.join("streaming"));
    let files = |d: &std::path::Path| {
        [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE].map(|f| d.join(f))
    };
    let dd_file = dir.join("dd.bin");
    let dd = |bytes: u64| -> Result<f64> {
        let t = Instant::now();
        let ok = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dd_file.display()))
            .arg("bs=1M")
            .arg(format!("count={}", bytes >> 20))
            .arg("conv=fsync")
            .stderr(std::process::Stdio::null())
            .status()?
            .success();
        let s = secs(t);
        anyhow::ensure!(ok, "dd failed");
        std::fs::remove_file(&dd_file)?;
        Ok(s)
    };
    // The disk of a shared machine is noisy: ROUNDS rounds of the three
    // writes in turn, medians compared.
    const ROUNDS: usize = 3;
    let (mut t_new, mut t_old, mut t_dd) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    // Each write starts after the last one's data has settled (`sync`, a
    // pause): whichever write follows another directly pays for its
    // writeback on this machine's disk.
    let settle = || -> Result<()> {
        anyhow::ensure!(Command::new("sync").status()?.success(), "sync failed");
        std::thread::sleep(std::time::Duration::from_secs(2));
        Ok(())
    };
    for _ in 0..ROUNDS {
        settle()?;
        t_new.push(write(&new_dir, false)?);
        bytes = files(&new_dir)
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        settle()?;
        t_dd.push(dd(bytes)?);
        settle()?;
        t_old.push(write(&old_dir, true)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (write_new, write_old, dd_s) = (median(&mut t_new), median(&mut t_old), median(&mut t_dd));
    for (a, b) in files(&old_dir).iter().zip(files(&new_dir).iter()) {
        anyhow::ensure!(
            std::fs::read(a)? == std::fs::read(b)?,
            "the streaming writer's {} differs from the safetensors crate's",
            b.display()
        );
    }

    // Reads from the disk: drop the files' pages from the cache first.
    let uncache = |d: &std::path::Path| -> Result<()> {
        for f in files(d) {
            let ok = Command::new("dd")
                .arg(format!("if={}", f.display()))
                .args(["iflag=nocache", "count=0"])
                .stderr(std::process::Stdio::null())
                .status()?
                .success();
            anyhow::ensure!(ok, "dd iflag=nocache failed");
        }
        Ok(())
    };
    uncache(&new_dir)?;
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    for f in files(&new_dir) {
        let mut file = std::fs::File::open(f)?;
        while std::io::Read::read(&mut file, &mut buf)? > 0 {}
    }
    let read_once = secs(t);
    uncache(&new_dir)?;
    let t = Instant::now();
    for sha in checkpoint::sha256_files(&files(&new_dir)) {
        sha?;
    }
    let validate = secs(t);
    // Before: the worker started after the validation. One on the
    // coordinator's machine finds the files in the page cache the
    // validation filled; one elsewhere reads them from disk.
    let read_into =
        |from: &std::path::Path, snap: &mut (Vec<f32>, Vec<f32>, Vec<f32>)| -> Result<()> {
            checkpoint::read_model_into(from, &slots, &mut snap.0)?;
            checkpoint::read_optimizer_into(from, &slots, &mut snap.1, &mut snap.2)?;
            Ok(())
        };
    let t = Instant::now();
    read_into(&new_dir, &mut snap)?;
    let load_warm = secs(t);
    uncache(&new_dir)?;
    let t = Instant::now();
    read_into(&new_dir, &mut snap)?;
    let load_new = secs(t);
    // Now: the coordinator hashes `hashed` while the worker reads `read`.
    let copy_dir = dir.join("copy");
    std::fs::create_dir_all(&copy_dir)?;
    for (from, to) in files(&new_dir).iter().zip(files(&copy_dir).iter()) {
        std::fs::copy(from, to)?;
    }
    let mut both = |hashed: &std::path::Path, read: &std::path::Path| -> Result<f64> {
        uncache(hashed)?;
        uncache(read)?;
        let t = Instant::now();
        let (sums, loaded) = std::thread::scope(|scope| {
            let hashing = scope.spawn(|| checkpoint::sha256_files(&files(hashed)));
            let loaded = read_into(read, &mut snap);
            (hashing.join(), loaded)
        });
        for sum in sums.map_err(|_| anyhow::anyhow!("the hashing thread failed"))? {
            sum?;
        }
        loaded?;
        Ok(secs(t))
    };
    let overlap_same = both(&new_dir, &new_dir)?;
    let overlap_other = both(&new_dir, &copy_dir)?;
    anyhow::ensure!(
        snap.0 == weights && snap.1 == m && snap.2 == v,
        "checkpoint did not round-trip"
    );
    uncache(&old_dir)?;
    let t = Instant::now();
    let (tensors, _) = checkpoint::reference::read_tensors(&old_dir.join(checkpoint::MODEL_FILE))?;
    let (moments, _) =
        checkpoint::reference::read_tensors(&old_dir.join(checkpoint::OPTIMIZER_FILE))?;
    let load_old = secs(t);
    anyhow::ensure!(
        tensors.len() == slots.len() && moments.len() == 2 * slots.len(),
        "reference read"
    );

    let mb = bytes as f64 / 1e6;
    println!(
        "checkpoint of GPT-2 small ({mb:.0} MB): training stall {:.0} ms (allocating copy {:.0} ms); medians of {ROUNDS}: write+fsync+sha256 {write_new:.2} s = {:.0} MB/s (safetensors crate + read-back hash {write_old:.2} s); dd conv=fsync {dd_s:.2} s = {:.0} MB/s; write/dd {:.2}",
        1e3 * stall,
        1e3 * stall_alloc,
        mb / write_new,
        mb / dd_s,
        dd_s / write_new,
    );
    println!(
        "resume of GPT-2 small: reading the files once from disk {read_once:.2} s = {:.0} MB/s; sha256 alone {validate:.2} s, load alone {load_new:.2} s (from disk), {load_warm:.2} s (page cache)",
        mb / read_once
    );
    println!(
        "  now (sha256 while loading): on the coordinator's machine {overlap_same:.2} s, resume/read {:.2}; a worker on another machine max(sha256, load) = {:.2} s, resume/read {:.2} (both at once from two copies on this one disk: {overlap_other:.2} s)",
        overlap_same / read_once,
        validate.max(load_new),
        validate.max(load_new) / read_once,
    );
    println!(
        "  before (sha256, then load): on the coordinator's machine {:.2} s, resume/read {:.2}; on another {:.2} s, resume/read {:.2} (reference reader {load_old:.2} s)",
        validate + load_warm,
        (validate + load_warm) / read_once,
        validate + load_new,
        (validate + load_new) / read_once,
    );
    // Into a device-resident state: staged whole (before) and one tensor
    // at a time (now), one child each for their peak RSS.
    let load = |kind: &str| -> Result<(f64, f64)> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--child-load", kind, "--checkpoint-dir"])
            .arg(&new_dir);
        measured_in(cmd, "load", "ms")
    };
    let (staged, streamed) = (load("staged")?, load("streamed")?);
    println!(
        "load into a device-resident state, one tensor at a time / staged whole: {:.2}x time, {:.2}x peak RSS",
        streamed.0 / staged.0,
        streamed.1 / staged.1
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// GPT-2 small's layout and a device-resident state of it on the CPU
/// device, from seeded initial weights.
fn gpt2_small_state() -> Result<(Vec<model::Slot>, DeviceState)> {
    let model = ModelConfig::default();
    let slots = model::layout(&model);
    let weights = model::initial_weights(&model, 1);
    let config = stride_job::config::OptimConfig::default();
    let state = DeviceState::new(
        &weights,
        &slots,
        &config,
        &Device::Cpu,
        Transfers::default(),
    )?;
    Ok((slots, state))
}

/// One optimiser-update line, in this (child) process: the device-resident
/// state of GPT-2 small on the CPU device, `steps` timed updates after a
/// warm-up one, with the fused in-place pass or its Candle-op reference.
fn child_update(kind: &str, steps: usize) -> Result<()> {
    let (slots, mut state) = gpt2_small_state()?;
    let n = model::parameter_count(&slots);
    let grad: Vec<f32> = (0..n).map(|i| ((i % 1999) as f32 - 999.0) * 1e-4).collect();
    let mut total = 0.0;
    for step in 0..=steps {
        state.zero_grad();
        state.add_grad(&candle_core::Tensor::from_slice(&grad, n, &Device::Cpu)?)?;
        let start = Instant::now();
        match kind {
            "fused" => state.update(0.5, 1e-4)?,
            _ => state.update_reference(0.5, 1e-4)?,
        };
        if step > 0 {
            total += start.elapsed().as_secs_f64();
        }
    }
    println!(
        "update {kind:<9} GPT-2 small {:>5.1}M params  {:>7.1} ms/update  peak RSS {:>6.0} MB",
        n as f64 / 1e6,
        1e3 * total / steps.max(1) as f64,
        peak_rss_mb(),
    );
    Ok(())
}

/// One load line, in this (child) process: checkpoint `dir` (GPT-2 small)
/// into a device-resident state on the CPU device, from the page cache
/// (read once first), the whole files staged in host buffers and uploaded
/// part by part (what the worker did before), or one tensor at a time
/// (`DeviceState::load`). The peak RSS is that of the first load (into a
/// fresh state, whose moments' pages it faults in: +1 GB for both).
fn child_load(kind: &str, dir: &std::path::Path) -> Result<()> {
    use stride_job::checkpoint;
    let (slots, mut state) = gpt2_small_state()?;
    for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
        std::fs::read(dir.join(f))?;
    }
    let mut load = || -> Result<f64> {
        let start = Instant::now();
        match kind {
            "staged" => {
                let w = checkpoint::read_model(dir, &slots)?;
                state.set_weights(&w)?;
                drop(w);
                let (m, v, step) = checkpoint::read_optimizer(dir, &slots)?;
                state.set_moments(&m, &v, step)?;
            }
            _ => state.load(dir, &slots, false)?,
        }
        Ok(start.elapsed().as_secs_f64())
    };
    // The first load also faults in the state's moments (a fresh state);
    // the second shows the load's own cost. The peak is the load's own:
    // Linux resets it to the current RSS on `5 > clear_refs`.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_mb("VmRSS:");
    let first = load()?;
    let peak = peak_rss_mb();
    let again = load()?;
    let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    state.read(&mut w, &mut m, &mut v)?;
    anyhow::ensure!(
        w == checkpoint::read_model(dir, &slots)?,
        "{kind}: the weights did not load"
    );
    println!(
        "load {kind:<8} GPT-2 small into a device-resident state (CPU device, page cache) {:>7.1} ms  peak RSS {peak:>6.0} MB  (RSS before {before:.0} MB; first load, into a fresh state, {:.1} ms)",
        1e3 * again,
        1e3 * first,
    );
    Ok(())
}

/// The fused update next to its Candle-op reference, one child each.
fn bench_update(steps: usize) -> Result<()> {
    let line = |kind: &str| -> Result<(f64, f64)> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--child-update", kind, "--steps", &steps.to_string()]);
        measured_in(cmd, "update", "ms/update")
    };
    let fused = line("fused")?;
    let reference = line("reference")?;
    println!(
        "update fused / Candle ops: {:.2}x time, {:.2}x peak RSS",
        fused.0 / reference.0,
        fused.1 / reference.1
    );
    Ok(())
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
    bench_ring(4, args.reps)?;
    let ring = bench_ring(64, args.reps)?;
    let mut ratios = format!(
        "ring all-reduce 64 MiB: {:.2}x memcpy, {:.2}x one-way TCP",
        ring / copy,
        ring / tcp
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
    bench_update(args.steps)?;
    if !args.no_checkpoint {
        bench_checkpoint(&args.checkpoint_dir)?;
    }
    Ok(())
}
