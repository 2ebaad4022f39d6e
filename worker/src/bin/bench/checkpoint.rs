//! A checkpoint's write and load beside `dd` and the safetensors crate's
//! own writer.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use stride_job::config::ModelConfig;
use stride_worker::engine::composed::state::DeviceState;
use stride_worker::model;
use stride_worker::transfer::Transfers;

use crate::measure::{measured_in, peak_rss_mb, status_mb};

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
pub(crate) fn bench_checkpoint(dir: &std::path::Path) -> Result<()> {
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
pub(crate) fn gpt2_small_state() -> Result<(Vec<model::Slot>, DeviceState)> {
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

/// One load line, in this (child) process: checkpoint `dir` (GPT-2 small)
/// into a device-resident state on the CPU device, from the page cache
/// (read once first), the whole files staged in host buffers and uploaded
/// part by part (what the worker did before), or one tensor at a time
/// (`DeviceState::load`). The peak RSS is that of the first load (into a
/// fresh state, whose moments' pages it faults in: +1 GB for both).
pub(crate) fn child_load(kind: &str, dir: &std::path::Path) -> Result<()> {
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
