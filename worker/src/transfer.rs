//! Every copy between host memory and a Candle device made by the
//! device-resident step goes through here, and is counted.
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

use candle_core::{DType, Device, Result, Tensor, WithDType};

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
}

impl Transfers {
    fn count(&self, purpose: Purpose, bytes: usize) {
        let counter = match purpose {
            Purpose::Step => &self.step,
            Purpose::State => &self.state,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
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

    /// Every element of `t` (any shape, read as f32) into `out`, which it
    /// replaces (Candle's copy to the host makes a new vector; copying that
    /// again into `out`'s old memory would cost a second pass).
    pub fn to_host(&self, purpose: Purpose, t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        *out = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.count(purpose, out.len() * 4);
        Ok(())
    }

    /// The single value of `t`, as f32.
    pub fn scalar(&self, purpose: Purpose, t: &Tensor) -> Result<f32> {
        let v = t.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        self.count(purpose, 4);
        Ok(v)
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
        assert_eq!(t.take(Purpose::Step), 16 + 4);
        assert_eq!(t.take(Purpose::State), 16);
        assert_eq!(t.take(Purpose::Step), 0, "taking resets");
    }
}
