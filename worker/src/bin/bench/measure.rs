//! What a line measures and how its figures come back: peak RSS, device
//! memory, a child's printed figures read within a time limit.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;

/// This process's peak resident set (VmHWM), in MB.
pub(crate) fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// A memory figure of this process's `/proc/self/status`, in MB.
pub(crate) fn status_mb(key: &str) -> f64 {
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
pub(crate) fn open_device(device: &str) -> Result<Device> {
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
pub(crate) fn device_memory_mb(device: &Device) -> (f64, f64) {
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
pub(crate) fn device_memory_mb(_: &Device) -> (f64, f64) {
    (f64::NAN, f64::NAN)
}

/// The number just before `unit` in a printed line (NaN if none).
pub(crate) fn figure_before(line: &str, unit: &str) -> f64 {
    line.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == unit)
        .and_then(|w| w[0].parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// Runs a command, echoes its output lines that match `keep`, and returns
/// (tokens/s, peak RSS MB) parsed from the last of them.
pub(crate) fn measured(cmd: Command, keep: &str) -> Result<(f64, f64)> {
    measured_in(cmd, keep, "tokens/s")
}

/// [`measured`] with the first figure the one before `unit`.
pub(crate) fn measured_in(mut cmd: Command, keep: &str, unit: &str) -> Result<(f64, f64)> {
    let out = cmd.output().context("cannot start a bench child")?;
    figures_of(&out, keep, unit)
}

/// [`measured`], but the child is killed after `limit` (a GPU line that
/// hangs or crawls must not take the others' time).
pub(crate) fn measured_within(
    mut cmd: Command,
    keep: &str,
    limit: std::time::Duration,
) -> Result<(f64, f64)> {
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
pub(crate) fn figures_of(out: &std::process::Output, keep: &str, unit: &str) -> Result<(f64, f64)> {
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
