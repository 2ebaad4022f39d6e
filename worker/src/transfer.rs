//! Every copy between host memory and a device made by the
//! device-resident steps is counted here: the composed engine's go through
//! here (Candle tensors), the fused CUDA engine's (raw cudarc buffers, its
//! backend's uploads of token ids) are recorded here as they are made.
//!
//! The count is the product's check that a step keeps its state on the
//! device: the step reports the bytes it moved ([`Transfers::take`]), and a
//! CPU test asserts that a step moves only the token ids in and a few
//! scalars out. A copy counts the same on every device — on a CPU device it
//! is a `memcpy`, on CUDA a PCIe transfer — so the CPU test checks the very
//! code a GPU runs.
//!
//! Checkpoint snapshots, loads and the every-K-steps weight hash cross too;
//! they are counted apart ([`Purpose::State`]) so the per-step figure shows
//! what the step itself costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, WithDType};

/// Why bytes crossed: the step's own traffic, or a copy of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Inside a training or evaluation step: token ids in, scalars out.
    Step,
    /// Snapshots for checkpoints, checkpoint loads, weight hashes.
    State,
}

/// Byte counters, shared by the clones of one trainer's handle.
#[derive(Debug, Clone, Default)]
pub struct Transfers {
    step: Arc<AtomicU64>,
    state: Arc<AtomicU64>,
    /// Copies to the host within steps: each is a wait for the device.
    step_reads: Arc<AtomicU64>,
}

impl Transfers {
    /// A copy to the host: a wait for the device.
    fn count_read(&self, purpose: Purpose, bytes: usize) {
        if purpose == Purpose::Step {
            self.step_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.count(purpose, bytes);
    }

    fn count(&self, purpose: Purpose, bytes: usize) {
        let counter = match purpose {
            Purpose::Step => &self.step,
            Purpose::State => &self.state,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a copy to the device made elsewhere: the fused CUDA engine's
    /// (its backend uploads the token ids each kernel reads, and its state
    /// loads are raw cudarc copies). Every copy the device-resident paths
    /// make is counted here, whoever makes it.
    pub fn record_upload(&self, purpose: Purpose, bytes: usize) {
        self.count(purpose, bytes);
    }

    /// Counts a copy to the host made elsewhere (the fused CUDA engine's):
    /// within a step, a wait for the device.
    pub fn record_download(&self, purpose: Purpose, bytes: usize) {
        self.count_read(purpose, bytes);
    }

    /// `data` as a tensor of `shape` on `device`.
    pub fn to_device<T: WithDType>(
        &self,
        purpose: Purpose,
        data: &[T],
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        self.count(purpose, size_of_val(data));
        Tensor::from_slice(data, shape, device)
    }

    /// Every element of `t` (any shape, read as f32) into `out`, whose
    /// memory is reused: a snapshot into the buffers of the last one
    /// touches no new pages. A contiguous f32 tensor is copied straight
    /// from its storage (CPU: a `memcpy`; CUDA: one device→host copy into
    /// `out`, a DMA where `out` is [`Pinned`]); anything else through
    /// Candle's conversion (which allocates).
    pub fn to_host(&self, purpose: Purpose, t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        if !(t.dtype() == DType::F32 && copy_contiguous(t, out)?) {
            *out = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        }
        self.count_read(purpose, out.len() * 4);
        Ok(())
    }

    /// The single value of `t`, as f32.
    pub fn scalar(&self, purpose: Purpose, t: &Tensor) -> Result<f32> {
        let v = t.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        self.count_read(purpose, 4);
        Ok(v)
    }

    /// Copies to the host within steps since the last call (each one a
    /// wait for the device), and zero from then on.
    pub fn take_step_reads(&self) -> u64 {
        self.step_reads.swap(0, Ordering::Relaxed)
    }

    /// Bytes counted for `purpose` since the last `take` of it, and zero
    /// from then on.
    pub fn take(&self, purpose: Purpose) -> u64 {
        match purpose {
            Purpose::Step => self.step.swap(0, Ordering::Relaxed),
            Purpose::State => self.state.swap(0, Ordering::Relaxed),
        }
    }
}

/// A host buffer page-locked for a CUDA device's copies, so that a copy
/// into it is one DMA at the link's speed rather than staged through the
/// driver's small pinned bounce buffers; unlocked when dropped. The
/// buffer is registered where it is (`cuMemHostRegister`), so it stays a
/// plain `Vec<f32>` the checkpoint writer writes from. It must not be
/// reallocated or freed while locked: its owner keeps the `Pinned` beside
/// it, sized once, and drops the `Pinned` first.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Pinned {
    at: usize,
    bytes: usize,
    #[cfg(feature = "cuda")]
    context: Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
}

impl Pinned {
    /// Page-locks `buf` for `device`'s copies. None on a CPU device, and
    /// — with a warning, the copies then staged as before — where the
    /// driver refuses (a limit on locked memory, say).
    #[allow(unsafe_code)]
    pub fn new(device: &Device, buf: &[f32]) -> Option<Pinned> {
        if buf.is_empty() {
            return None;
        }
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                use candle_core::cuda_backend::cudarc::driver::sys;
                let context = d.cuda_stream().context().clone();
                let (at, bytes) = (buf.as_ptr() as usize, size_of_val(buf));
                let done = context.bind_to_thread().and_then(|()| {
                    // SAFETY: `buf` is `bytes` of live host memory; the
                    // owner unregisters it (drops this) before freeing it.
                    unsafe {
                        sys::cuMemHostRegister_v2(
                            at as *mut std::ffi::c_void,
                            bytes,
                            sys::CU_MEMHOSTREGISTER_PORTABLE,
                        )
                    }
                    .result()
                });
                match done {
                    Ok(()) => Some(Pinned { at, bytes, context }),
                    Err(e) => {
                        tracing::warn!(
                            "cannot page-lock {bytes} bytes of snapshot buffers ({e}); checkpoint copies go through pageable memory"
                        );
                        None
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
impl Drop for Pinned {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: `at` was registered by `new` and is still allocated (the
        // owner drops this first).
        let undone = self.context.bind_to_thread().and_then(|()| {
            unsafe { sys::cuMemHostUnregister(self.at as *mut std::ffi::c_void) }.result()
        });
        if let Err(e) = undone {
            tracing::warn!(
                "cannot unlock {} bytes of a snapshot buffer: {e}",
                self.bytes
            );
        }
    }
}

/// Copies a contiguous f32 tensor's values into `out` (resized to fit,
/// its memory reused); false where the storage is not one this knows.
fn copy_contiguous(t: &Tensor, out: &mut Vec<f32>) -> Result<bool> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(false);
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            out.clear();
            out.extend_from_slice(&data[start..end]);
            Ok(true)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(cuda) => {
            let view = cuda.as_cuda_slice::<f32>()?.slice(start..end);
            out.resize(end - start, 0.0);
            let stream = cuda.device.cuda_stream();
            let wrap = |e| candle_core::Error::Cuda(Box::new(e));
            stream
                .memcpy_dtoh(&view, out.as_mut_slice())
                .map_err(wrap)?;
            stream.synchronize().map_err(wrap)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_counted_by_purpose_and_taken_once() {
        let t = Transfers::default();
        let d = Device::Cpu;
        let x = t
            .to_device(Purpose::Step, &[1u32, 2, 3, 4], &[2, 2], &d)
            .expect("candle");
        assert_eq!(x.dims(), &[2, 2]);
        let s = t
            .scalar(Purpose::Step, &Tensor::new(2.5f32, &d).expect("candle"))
            .expect("candle");
        assert_eq!(s, 2.5);
        let mut out = Vec::new();
        t.to_host(
            Purpose::State,
            &x.to_dtype(DType::F32).expect("candle"),
            &mut out,
        )
        .expect("candle");
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
        // An f32 view (part of a larger tensor) into the same buffer: its
        // memory is reused, only the view's values land in it.
        let big = Tensor::arange(0f32, 1000.0, &d).expect("candle");
        let mut reused = Vec::with_capacity(1000);
        let at = reused.as_ptr();
        t.to_host(
            Purpose::State,
            &big.narrow(0, 10, 990).expect("view"),
            &mut reused,
        )
        .expect("candle");
        assert_eq!(reused.as_ptr(), at, "no new allocation");
        assert_eq!((reused[0], reused.len()), (10.0, 990));
        assert_eq!(t.take(Purpose::Step), 16 + 4);
        assert_eq!(t.take(Purpose::State), 16 + 990 * 4);
        assert_eq!(t.take(Purpose::Step), 0, "taking resets");
        assert_eq!(t.take_step_reads(), 1, "the scalar; state copies apart");
    }
}
