//! Generated gRPC types and stubs for `stride.v1` (see `stride/v1/stride.proto`).
//!
//! This crate owns the wire contract: the generated code, and in [`client`]
//! the parts of it that are not in the `.proto` (the token metadata, client
//! TLS). No job logic, no validation. Both binaries depend on it; the
//! coordinator serves `Coordinator`, workers are its clients.

pub mod client;

/// The worker's exit codes: a contract with whatever supervises workers
/// (Kubernetes' pod failure policy in `deploy/k8s/base/workers.yaml`, the
/// README's "Exit codes"). The coordinator sends one in `Shutdown`.
pub mod exit {
    /// The job finished (or did not need this worker).
    pub const DONE: i32 = 0;
    /// This worker failed (a crash, a panic on its compute thread, a
    /// coordinator gone for good): a fresh process may do better — retry.
    pub const FAILED: i32 = 1;
    /// Bad input (flags, token, a config or data this worker cannot use):
    /// a restart cannot help — do not retry.
    pub const BAD_INPUT: i32 = 2;
    /// Removed from the job after a failure, or the coordinator was
    /// stopped by a signal: a replacement may join — retry.
    pub const REMOVED: i32 = 3;
    /// The coordinator ended the job as failed: there is nothing left to
    /// rejoin — do not retry.
    pub const JOB_FAILED: i32 = 4;
}

/// Bumped on every incompatible change of the `.proto` files; checked at
/// registration together with the crate version.
pub const PROTOCOL_VERSION: u32 = 2;

#[allow(missing_docs, unused_qualifications, clippy::all)]
pub mod v1 {
    tonic::include_proto!("stride.v1");
}
