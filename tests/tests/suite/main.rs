//! The end-to-end tests, one test binary: real coordinator and worker
//! processes on 127.0.0.1, one module per subject, helpers in `common`.
//!
//!     cargo test --workspace                      # all of them (builds every binary)
//!     cargo test -p stride-tests --test suite failures::   # one module
//!
//! `cargo test` builds a package's binaries only for its own integration
//! tests: `coordinator/tests/cli.rs` (the coordinator's offline commands)
//! and `worker/tests/allocations.rs` (alone in its binary for its counting
//! allocator) are what make it build the `coordinator`, `loadtest`,
//! `worker` and `bench` binaries this suite runs, so they stay in their
//! packages; every other process-level test is here.
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
mod health;
mod observability;
mod tls;
mod worker_cli;
