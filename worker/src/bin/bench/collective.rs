//! The ring all-reduce beside memcpy and one-way TCP.

use std::time::Instant;

use anyhow::Result;
use stride_job::config::GradCommDtype;
use stride_worker::collective::local_ring_with;

/// A 2-rank ring all-reduce of `mib` MiB of f32 with `wire` on the wire;
/// its algorithm bandwidth counts the f32 bytes summed.
pub(crate) fn bench_ring(mib: usize, reps: usize, wire: GradCommDtype) -> Result<f64> {
    let n = mib * (1 << 20) / 4;
    let times = local_ring_with(2, wire, |mut c| {
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
        "ring all-reduce, 2 ranks, {mib:>3} MiB, {wire:>4} wire: {:>7.1} ms  algorithm bandwidth {gbs:>6.2} GB/s",
        1e3 * t
    );
    Ok(gbs)
}

/// Single-thread copy of a 64 MiB buffer into another (both faulted in).
pub(crate) fn bench_memcpy(reps: usize) -> f64 {
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
pub(crate) fn bench_tcp(reps: usize) -> Result<f64> {
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
