//! The Stride worker: a GPT-2 model computed by the fused engine (CPU or
//! CUDA kernels) or Candle ops ([`engine`], [`model`]), Stride's own
//! AdamW with clipping ([`optim`]), the gradient collective
//! ([`collective`]), the training step ([`trainer`]) and the gRPC session
//! with the coordinator ([`session`]).
//!
//! A worker never decides anything about the schedule, the data order or
//! when to evaluate or stop: it applies the coordinator's plans and reports.

pub mod alloc;
pub mod collective;
mod compute;
pub mod engine;
pub mod handoff;
pub mod model;
pub mod optim;
pub mod sample;
pub mod session;
pub mod trainer;
pub mod transfer;

/// The GPU of the `gpu` tests (`cuda` feature, `#[ignore]`d): they run only
/// when asked with `STRIDE_TEST_CUDA=1 … -- --ignored gpu`, and say so
/// otherwise.
#[cfg(all(test, feature = "cuda"))]
pub(crate) fn test_cuda_device() -> candle_core::Device {
    assert_eq!(
        std::env::var("STRIDE_TEST_CUDA").as_deref(),
        Ok("1"),
        "set STRIDE_TEST_CUDA=1 to run the GPU tests"
    );
    candle_core::Device::new_cuda(0).expect("a CUDA device (is a GPU visible?)")
}
