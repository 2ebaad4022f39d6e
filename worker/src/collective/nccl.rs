//! The GPU collective: NCCL all-reduce through `cudarc::nccl`, on a CUDA
//! stream of its own, forked from Candle's (the cudarc Candle re-exports,
//! so there is one cudarc in the tree). Compiled only with the `cuda`
//! feature.
//!
//! Streams: the communicator's stream is not Candle's compute stream, so a
//! bucket's all-reduce can run while backward computes the blocks below
//! it (`engine::composed::segmented_backward`). The order between the two streams is
//! cudarc's event tracking (on by default, active once a context has a
//! second stream): each buffer records an event when a stream reads or
//! writes it, and the next stream to use it waits on that event. So the
//! all-reduce of a bucket waits for the kernels that wrote the gradient,
//! the next write into the gradient (the next block's) waits for the
//! all-reduce, and the optimizer's kernel waits for the last bucket — no
//! host synchronisation. What this costs: once there are two streams,
//! cudarc records an event per buffer per kernel launch (a few µs each).
//! Unmeasured: no GPU has run it yet (BENCHMARKS.md, "The GPU check").
//!
//! Bootstrap: rank 0 calls [`new_unique_id`]; the bytes go to the
//! coordinator in a `CollectiveBootstrap` message and come back to every
//! rank, which calls [`Nccl::new`] with the same id, its rank and the world
//! size (`ncclCommInitRank`). A restart forms a new communicator the same
//! way, with a new id.
//!
//! Three entry points: [`Collective::all_reduce_tensor`] sums the
//! composed engine's gradient tensor in place in device memory (no copy),
//! bucket by bucket during its backward; [`Collective::all_reduce_device`]
//! sums the fused CUDA engine's gradient, a raw cudarc buffer on the
//! engine's stream (Candle's), in place, once after the backward (no
//! buckets yet); `all_reduce_sum` sums a host buffer through a device copy
//! (kept for host-resident callers and the tests).
//!
//! Not yet: aborting a blocked NCCL call from another thread. cudarc
//! aborts a communicator only when it is dropped, so a rank blocked on a
//! dead peer waits for NCCL's own timeout; the coordinator still names the
//! lost rank and restarts the job without it.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc;
use cudarc::driver::CudaStream;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn setup(what: &str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Setup(format!("NCCL: {what}: {e:?}"))
}

/// A fresh NCCL unique id (rank 0 only), as bytes for the coordinator.
pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
    let id = Id::new().map_err(|e| setup("ncclGetUniqueId failed", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator.
#[derive(Debug)]
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world` on `device`'s
    /// stream; returns once every rank has joined.
    pub fn new(
        device: &candle_core::Device,
        rank: usize,
        world: usize,
        id: &[u8],
    ) -> Result<Nccl, CollectiveError> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(CollectiveError::Setup(
                "NCCL needs a CUDA device (worker.device = \"cuda\")".into(),
            ));
        };
        if id.len() != ID_BYTES {
            return Err(CollectiveError::Setup(format!(
                "the coordinator sent a collective id of {} bytes; NCCL's has {ID_BYTES}: are all workers CUDA builds of the same version?",
                id.len()
            )));
        }
        let mut raw = [0 as std::ffi::c_char; ID_BYTES];
        for (d, s) in raw.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let stream = dev
            .cuda_stream()
            .fork()
            .map_err(|e| setup("cannot create a stream for NCCL", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(raw))
            .map_err(|e| setup("ncclCommInitRank failed", e))?;
        Ok(Nccl { comm, stream })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(|e| setup("copy to the device", e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| setup("all-reduce", e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| setup("copy to the host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| setup("stream synchronize", e))
    }

    /// In place on the fused CUDA engine's gradient buffer, on the
    /// communicator's stream, ordered with the engine's stream by cudarc's
    /// events (module doc).
    fn all_reduce_device(
        &mut self,
        buf: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<(), CollectiveError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| setup("all-reduce of the gradient", e))
    }

    /// In place on the tensor's device memory, on the communicator's
    /// stream, ordered with Candle's by cudarc's events (module doc).
    fn all_reduce_tensor(
        &mut self,
        t: &candle_core::Tensor,
        part: std::ops::Range<usize>,
    ) -> Result<(), CollectiveError> {
        let op = NcclSum {
            comm: &self.comm,
            part,
            failed: std::cell::RefCell::new(None),
        };
        let done = t.inplace_op1(&op);
        if let Some(e) = op.failed.into_inner() {
            return Err(e);
        }
        done.map_err(|e| setup("in-place all-reduce of the gradient", e))
    }
}

/// NCCL's sum over a CUDA tensor's own buffer.
struct NcclSum<'a> {
    comm: &'a Comm,
    /// The values of the tensor to sum (a bucket).
    part: std::ops::Range<usize>,
    failed: std::cell::RefCell<Option<CollectiveError>>,
}

impl candle_core::InplaceOp1 for NcclSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _storage: &mut candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums CUDA tensors; this one is on the CPU")
    }

    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the all-reduce sums contiguous tensors");
        };
        let (from, to) = (start + self.part.start, start + self.part.end);
        if self.part.start > self.part.end || to > end {
            candle_core::bail!("bucket {:?} lies outside the tensor", self.part);
        }
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(from..to);
        if let Err(e) = self.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum) {
            *self.failed.borrow_mut() = Some(setup("all-reduce", e));
            candle_core::bail!("the all-reduce failed");
        }
        Ok(())
    }
}

/// Ignored by default (CI has no GPU); run with
/// `cargo test -p stride-worker --features cuda nccl -- --ignored` on a
/// machine with GPUs.
#[cfg(test)]
mod tests {
    use super::*;

    /// For 1..=N GPUs (one thread and rank per GPU), NCCL's sum equals the
    /// sum computed on the CPU: of a host buffer (through a device copy),
    /// of a device tensor in place (the composed engine's path), of the
    /// same tensor bucket by bucket, and of a raw device buffer in place
    /// (the fused CUDA engine's path), bit for bit.
    #[test]
    #[ignore = "needs NVIDIA GPUs: cargo test -p stride-worker --features cuda nccl -- --ignored"]
    fn nccl_all_reduce_matches_a_cpu_sum() {
        let gpus = cudarc::driver::CudaContext::device_count().expect("CUDA driver") as usize;
        assert!(gpus > 0, "no GPU is visible");
        let n = 1000;
        let input = |rank: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + rank * 13) % 97) as f32 * 0.25)
                .collect()
        };
        for world in 1..=gpus {
            let id = new_unique_id().expect("unique id");
            let expected: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| input(r)[i]).sum())
                .collect();
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..world)
                    .map(|rank| {
                        let id = id.clone();
                        s.spawn(move || {
                            let device = candle_core::Device::new_cuda(rank).expect("device");
                            let mut c = Nccl::new(&device, rank, world, &id).expect("communicator");
                            let mut buf = input(rank);
                            c.all_reduce_sum(&mut buf).expect("all-reduce");
                            let t = candle_core::Tensor::from_slice(&input(rank), n, &device)
                                .expect("tensor");
                            c.all_reduce_tensor(&t, 0..n).expect("in-place all-reduce");
                            let in_place = t.to_vec1::<f32>().expect("to the host");
                            assert_eq!(in_place, buf, "rank {rank}: in place vs host buffer");
                            // Bucket by bucket, in the device state's
                            // backward order (its offsets are what this
                            // checks: these sums are exact in any order).
                            let b = candle_core::Tensor::from_slice(&input(rank), n, &device)
                                .expect("tensor");
                            for part in [700..1000, 13..700, 0..13] {
                                c.all_reduce_tensor(&b, part).expect("bucket all-reduce");
                            }
                            let bucketed = b.to_vec1::<f32>().expect("to the host");
                            assert_eq!(bucketed, buf, "rank {rank}: bucketed vs unbucketed");
                            // The fused CUDA engine's path: a raw buffer on
                            // the device's stream, in place.
                            let stream = device
                                .as_cuda_device()
                                .expect("a CUDA device")
                                .cuda_stream();
                            let mut raw = stream.clone_htod(&input(rank)).expect("upload");
                            c.all_reduce_device(&mut raw.as_view_mut())
                                .expect("device all-reduce");
                            let raw = stream.clone_dtoh(&raw).expect("download");
                            stream.synchronize().expect("synchronize");
                            assert_eq!(raw, buf, "rank {rank}: raw device buffer vs host buffer");
                            buf
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank"))
                    .collect()
            });
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got, &expected, "world {world}, rank {rank}");
            }
        }
    }
}
