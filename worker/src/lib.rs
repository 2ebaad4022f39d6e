//! The Stride worker: a GPT-2 model computed by the fused CPU engine or
//! Candle ops ([`engine`], [`model`]), Stride's own
//! AdamW with clipping ([`optim`]), the gradient collective
//! ([`collective`]), the training step ([`trainer`]) and the gRPC session
//! with the coordinator ([`session`]).
//!
//! A worker never decides anything about the schedule, the data order or
//! when to evaluate or stop: it applies the coordinator's plans and reports.

pub mod alloc;
pub mod collective;
mod compute;
pub mod device_state;
pub mod engine;
pub mod handoff;
pub mod model;
pub mod optim;
pub mod session;
pub mod trainer;
pub mod transfer;
