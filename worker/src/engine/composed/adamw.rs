//! The device-resident AdamW update as one in-place pass: each element of
//! the master weights and both moments is read once and written once, the
//! gradient and the decay mask read once — no transient buffer of the
//! state's size (the Candle-op version, [`DeviceState::update_reference`],
//! writes six and stays as this one's reference in tests).
//!
//! A Candle in-place op ([`candle_core::InplaceOp3`]) on the state tensor
//! `[weights | m | v]`, with the flat gradient and the u8 decay mask as its
//! sources:
//! - on the CPU, the element loop of [`Coefficients::apply`], in parallel
//!   over chunks (element-wise, so the result does not depend on the
//!   thread count) — the same bits as the host [`crate::optim::AdamW`];
//! - on CUDA, the kernel `stride_adamw` of `worker/cuda/adamw.cu`,
//!   compiled to PTX for the job's compute capability by `build.rs` (nvcc,
//!   `-fmad=false`, so it repeats the CPU's arithmetic operation for
//!   operation) and loaded through cudarc by Candle's device, on Candle's
//!   stream: ordered after the all-reduce, before the next forward, with
//!   no host synchronisation.
//!
//! The gradient is scaled as it is read, by the factor the state holds
//! after its `3n` values (averaging over micro-batches and ranks, times the
//! clip factor when clipping): the device computes it from the norm, so
//! the host never waits for the norm before enqueuing the update.
//!
//! [`DeviceState::update_reference`]: super::state::DeviceState::update_reference

use std::ops::Range;

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

use crate::optim::Coefficients;

/// Elements per parallel task on the CPU (256 KiB of each buffer).
const CHUNK: usize = 64 * 1024;

/// One AdamW update in place of a state `[w | m | v | factor]`; see the
/// module doc.
#[derive(Debug, Clone, Copy)]
pub struct FusedAdamW {
    pub k: Coefficients,
}

/// The element ranges of the state, the gradient and the decay mask, each
/// contiguous and of the size the gradient's `n` parameters ask for.
fn operands(state: &Layout, grad: &Layout, decay: &Layout) -> Result<(usize, [Range<usize>; 3])> {
    let span = |layout: &Layout, want: usize, what: &str| -> Result<Range<usize>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the fused AdamW needs a contiguous {what}");
        };
        if end - start != want {
            candle_core::bail!(
                "the fused AdamW got a {what} of {} values, expected {want}",
                end - start
            );
        }
        Ok(start..end)
    };
    let n = grad.shape().elem_count();
    Ok((
        n,
        [
            span(state, 3 * n + 1, "state")?,
            span(grad, n, "gradient")?,
            span(decay, n, "decay mask")?,
        ],
    ))
}

impl candle_core::InplaceOp3 for FusedAdamW {
    fn name(&self) -> &'static str {
        "stride-adamw"
    }

    fn cpu_fwd(
        &self,
        state: &mut CpuStorage,
        state_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
        decay: &CpuStorage,
        decay_l: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(state), CpuStorage::F32(grad), CpuStorage::U8(decay)) =
            (state, grad, decay)
        else {
            candle_core::bail!("the fused AdamW takes an f32 state and gradient and a u8 mask");
        };
        let (n, [s, g, d]) = operands(state_l, grad_l, decay_l)?;
        let (w, moments) = state[s].split_at_mut(n);
        let (m, rest) = moments.split_at_mut(n);
        let (v, factor) = rest.split_at_mut(n);
        let (k, factor) = (self.k, factor[0]);
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad[g].par_chunks(CHUNK))
            .zip(decay[d].par_chunks(CHUNK))
            .for_each(|((((w, m), v), g), d)| {
                for i in 0..w.len() {
                    let g = g[i] * factor;
                    k.apply(&mut w[i], &mut m[i], &mut v[i], g, d[i] != 0);
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        state: &mut candle_core::CudaStorage,
        state_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
        decay: &candle_core::CudaStorage,
        decay_l: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

        let (n, [s, g, d]) = operands(state_l, grad_l, decay_l)?;
        let func = state
            .device
            .get_or_load_custom_func("stride_adamw", "stride_adamw", PTX)?;
        let grad = grad.as_cuda_slice::<f32>()?.slice(g);
        let decay = decay.as_cuda_slice::<u8>()?.slice(d);
        let mut state = state.as_cuda_slice_mut::<f32>()?.slice_mut(s);
        let k = self.k;
        let n64 = n as u64;
        // A grid-stride loop: enough blocks to fill an H100 many times
        // over, whatever the state's size.
        let threads = 256u32;
        let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&mut state);
        b.arg(&grad);
        b.arg(&decay);
        b.arg(&n64);
        b.arg(&k.beta1);
        b.arg(&k.one_minus_beta1);
        b.arg(&k.beta2);
        b.arg(&k.one_minus_beta2);
        b.arg(&k.step_size);
        b.arg(&k.bc2_sqrt);
        b.arg(&k.eps);
        b.arg(&k.shrink);
        // SAFETY: the kernel's parameters are the ones pushed above, in
        // order and type (adamw.cu); every index it touches is below n, the
        // length of the gradient and the mask, and 3n + 1, the state's.
        unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(())
    }
}

/// The kernel, compiled by build.rs.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use stride_job::config::OptimConfig;

    /// On the CPU the fused update is the host AdamW, bit for bit (same
    /// coefficients, same element arithmetic), on more elements than one
    /// parallel chunk, with decay on some elements only.
    #[test]
    fn the_cpu_fused_update_is_the_host_adamw_bit_for_bit() {
        let config = OptimConfig::default();
        let n = 3 * CHUNK + 17;
        let vals = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let w = vals(1);
        let decays: Vec<u8> = (0..n).map(|i| u8::from(i % 3 != 0)).collect();
        let mut host_w = w.clone();
        let (mut host_m, mut host_v) = (vec![0f32; n], vec![0f32; n]);
        let dev = Device::Cpu;
        // [w | m = 0 | v = 0 | factor]: the factor 1/8 (say, 1/4 for four
        // micro-batches, times a clip factor of 1/2).
        let state = Tensor::cat(
            &[
                Tensor::from_slice(&w, n, &dev).expect("candle"),
                Tensor::zeros(2 * n, candle_core::DType::F32, &dev).expect("candle"),
                Tensor::new(&[0.125f32], &dev).expect("candle"),
            ],
            0,
        )
        .expect("candle");
        let mask = Tensor::from_slice(&decays, n, &dev).expect("candle");
        for step in 1..=3u64 {
            let g = vals(10 + step as u32);
            let op = FusedAdamW {
                k: Coefficients::new(&config, step, 3e-3),
            };
            for i in 0..n {
                let gi = g[i] * 0.125;
                op.k.apply(
                    &mut host_w[i],
                    &mut host_m[i],
                    &mut host_v[i],
                    gi,
                    decays[i] != 0,
                );
            }
            let grad = Tensor::from_slice(&g, n, &dev).expect("candle");
            state.inplace_op3(&grad, &mask, &op).expect("fused update");
        }
        let got = state.to_vec1::<f32>().expect("candle");
        assert!(got[..n] == host_w[..], "weights");
        assert!(got[n..2 * n] == host_m[..], "first moments");
        assert!(got[2 * n..3 * n] == host_v[..], "second moments");
        assert_eq!(got[3 * n], 0.125, "the factor is read, not written");
        assert!(got[..n] != w[..], "the update changed the weights");
    }

    /// A state, gradient or mask of the wrong size is refused, not read
    /// past its end (a state of 31 values fits a gradient of 10, not 9).
    #[test]
    fn operands_of_the_wrong_size_are_refused() {
        let dev = Device::Cpu;
        let state = Tensor::zeros(31, candle_core::DType::F32, &dev).expect("candle");
        let grad = Tensor::zeros(9, candle_core::DType::F32, &dev).expect("candle");
        let mask = Tensor::zeros(10, candle_core::DType::U8, &dev).expect("candle");
        let op = FusedAdamW {
            k: Coefficients::new(&OptimConfig::default(), 1, 1e-3),
        };
        let err = state.inplace_op3(&grad, &mask, &op).expect_err("9 vs 10");
        assert!(err.to_string().contains("expected"), "{err}");
    }
}
