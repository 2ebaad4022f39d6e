//! `stride-kernels`: the CPU kernels of the worker's fused engine — one
//! function per GPT layer and direction (embedding, LayerNorm, linear,
//! causal self-attention, GELU, the tied LM head with the cross-entropy),
//! each writing into buffers its caller owns, generic over `f32` (training)
//! and `f64` (gradient checks).
//!
//! A crate of its own so that the one `unsafe` call of the engine, into
//! `gemm` (`gemm.rs`), sits in one small place with its checks, and the
//! kernels are tested against their formulas apart from any model. (The
//! kernels are generic, so they are compiled where they are instantiated;
//! the workspace `Cargo.toml` optimises this crate and the worker even in
//! debug builds, so tests that train real models stay fast.)
//!
//! It knows shapes, not models: the layer sequence, the parameter layout
//! and the buffers live in the worker's `engine` module.

pub mod gemm;
mod kernels;
pub mod real;
#[cfg(test)]
mod tests;

pub use kernels::*;
pub use real::Real;
