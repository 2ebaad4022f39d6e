//! The device-resident AdamW update (one fused in-place pass) beside its
//! Candle-op reference.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use stride_worker::model;

use crate::checkpoint::gpt2_small_state;
use crate::measure::{measured_in, peak_rss_mb};

/// One optimiser-update line, in this (child) process: the device-resident
/// state of GPT-2 small on the CPU device, `steps` timed updates after a
/// warm-up one, with the fused in-place pass or its Candle-op reference.
pub(crate) fn child_update(kind: &str, steps: usize) -> Result<()> {
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

/// The fused update next to its Candle-op reference, one child each.
pub(crate) fn bench_update(steps: usize) -> Result<()> {
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
