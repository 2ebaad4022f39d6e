//! What the Stride coordinator and workers must agree on, as pure logic:
//! the config schema ([`config`]), the learning-rate schedule
//! ([`schedule`]), token files and the corpus ([`tokens`], [`synthetic`]),
//! the data plan ([`sampler`]) and the seeded RNG both sides draw from
//! ([`rng`]).
//!
//! This crate must stay free of tensors, devices and networking: the
//! coordinator links it and must never link Candle, CUDA or NCCL.

pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod cuda_shapes;
pub mod files;
pub mod names;
pub mod params;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod synthetic;
pub mod test_hooks;
pub mod tokens;

pub use config::{Config, ConfigError, RawConfig};
pub use sampler::{DataCursor, Sampler};
pub use schedule::{Schedule, Segment, SegmentKind};
