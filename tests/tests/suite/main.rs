//! The end-to-end tests, one test binary: real coordinator and worker
//! processes on 127.0.0.1, one module per subject, helpers in `common`.
//!
//!     cargo test --workspace                      # all of them (builds every binary)
//!     cargo test -p stride-tests --test suite failures::   # one module
//!
//! Tests of several modules run side by side (two at a time on CI's two
//! cores), except the failure tests, which measure heartbeats and step
//! timeouts and so run alone (`common::alone` / `common::beside_others`).

mod common;

mod bad_input;
mod chaos;
mod checkpoints;
mod e2e;
mod failures;
mod gpu;
mod observability;
mod tls;
