//! The model lines: a `Trainer` on a synthetic corpus timed in a child
//! process per line (CPU shapes beside PyTorch; `--cuda`: GPT-2 small on
//! the fused and composed CUDA engines, MFU and peak device memory).

use std::process::Command;

use anyhow::{Context, Result};
use stride_job::config::{Config, ConfigSource, ModelConfig, RawConfig};
use stride_worker::collective::Solo;
use stride_worker::model;
use stride_worker::trainer::Trainer;

use crate::measure::{device_memory_mb, measured, measured_within, open_device, peak_rss_mb};

/// A model shape the bench trains: name, model, micro-batch.
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    pub(crate) model: ModelConfig,
    pub(crate) batch: usize,
}

pub(crate) fn shapes() -> Vec<Shape> {
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
pub(crate) fn cuda_shapes() -> Vec<Shape> {
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
pub(crate) const H100_PEAK_FLOPS: f64 = 989e12;

/// Training FLOPs per token of a GPT (PaLM's estimate, nanoGPT's MFU):
/// 6N for the parameters' products forward and backward, 12·L·C·T for
/// attention's.
pub(crate) fn flops_per_token(parameters: usize, m: &ModelConfig) -> f64 {
    6.0 * parameters as f64 + 12.0 * (m.n_layer * m.n_embd * m.context) as f64
}

/// A resolved job config for `shape` on one CPU worker with `engine`.
pub(crate) fn config(shape: &Shape, engine: &str) -> Result<Config> {
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

/// One GPU model line, in this (child) process: two warm-up steps (the
/// first one's cuBLASLt heuristics and, for the composed engine, the PTX
/// compilation of Candle's kernels), then `steps` timed `Trainer::step`s,
/// each ending in the step's read of its scalars (so its time is the
/// device's).
pub(crate) fn child_cuda(shape: &Shape, engine: &str, steps: usize) -> Result<()> {
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
pub(crate) fn child(name: &str, engine: &str, steps: usize, device: &str) -> Result<()> {
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

pub(crate) fn stride_line(
    name: &str,
    engine: &str,
    steps: usize,
    default_malloc: bool,
) -> Result<(f64, f64)> {
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
pub(crate) fn bench_cuda(steps: usize, line_timeout: std::time::Duration) -> Result<()> {
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
